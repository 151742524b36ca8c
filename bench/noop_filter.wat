;; The cheapest filter there is, for bench/bench_proxy.py's "+ no-op filter" row: it exports what
;; the ABI needs (memory, an allocator, the ABI marker) and request/response header callbacks that
;; return Continue. Whatever it costs is what the host and the chain cost around a filter.
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $p))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0)))
