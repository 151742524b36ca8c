//! A sluice component filter in Zig: the `sluice:filter@0.1.0` world (sluice/config/wit/filter.wit)
//! implemented by hand on the canonical ABI, built for wasm32-freestanding and wrapped into a
//! component by wasm-tools (build.py next to this file).
//!
//! Configuration (JSON): {"header": "x-tag", "value": "blue", "deny_prefix": "/admin"}
//!   on-request   sets `header: value` on the request; a `:path` starting with `deny_prefix`
//!                (when given) gets a local 403 instead, logged at warn level
//!   on-response  adds `x-tagged-by: zig-component`
const std = @import("std");

// -- canonical ABI shapes (32-bit: pointers and lengths are u32) ------------------------------

const Str = extern struct { ptr: [*]const u8, len: usize };
const Header = extern struct { name: Str, value: Str };
const Headers = extern struct { ptr: [*]const Header, len: usize };
const Strs = extern struct { ptr: [*]const Str, len: usize };
const Bytes = extern struct { ptr: [*]const u8, len: usize };

const Edits = extern struct { remove: Strs, set: Headers, add: Headers };
const Reply = extern struct { status: u16, headers: Headers, body: Bytes };
const Callout = extern struct { cluster: Str, headers: Headers, body: Bytes, timeout_ms: u32 };
const Action = extern struct {
    tag: u8, // 0 continue, 1 reply, 2 callout
    payload: extern union { edits: Edits, reply: Reply, callout: Callout },
};
const Configured = extern struct { is_err: u8, err: Str };

const Level = enum(i32) { trace, debug, info, warn, @"error", critical };
extern "wasi:logging/logging@0.1.0-draft" fn log(level: Level, ctx: [*]const u8, ctx_len: usize, msg: [*]const u8, msg_len: usize) void;

fn str(s: []const u8) Str {
    return .{ .ptr = s.ptr, .len = s.len };
}

fn slice(s: Str) []const u8 {
    return s.ptr[0..s.len];
}

const empty_headers = Headers{ .ptr = undefined, .len = 0 };
const empty_strs = Strs{ .ptr = undefined, .len = 0 };

// -- memory: a bump heap for what the host passes in, reset after every call ------------------

var heap_bytes: [256 * 1024]u8 align(16) = undefined;
var heap_top: usize = 0;

fn cabiRealloc(old: ?[*]u8, old_size: usize, alignment: usize, new_size: usize) callconv(.c) ?[*]u8 {
    const start = std.mem.alignForward(usize, heap_top, alignment);
    if (start + new_size > heap_bytes.len) @trap();
    heap_top = start + new_size;
    const out = heap_bytes[start..].ptr;
    if (old) |o| @memcpy(out[0..@min(old_size, new_size)], o[0..@min(old_size, new_size)]);
    return out;
}

fn postReturn(_: usize) callconv(.c) void {
    heap_top = 0;
}

// -- the filter ----------------------------------------------------------------------------------

var config_bytes: [4096]u8 = undefined;
var header_name: []const u8 = "";
var header_value: []const u8 = "";
var deny_prefix: []const u8 = "";

var configured: Configured = undefined;
var action: Action = undefined;
var one_header: [1]Header = undefined;

const Config = struct { header: []const u8, value: []const u8, deny_prefix: []const u8 = "" };

fn configure(ptr: [*]const u8, len: usize) callconv(.c) *Configured {
    configured = .{ .is_err = 0, .err = str("") };
    // The input and the parser's allocations live in the bump heap until this call returns.
    var fba = std.heap.FixedBufferAllocator.init(heap_bytes[heap_top..]);
    const parsed = std.json.parseFromSliceLeaky(Config, fba.allocator(), ptr[0..len], .{
        .ignore_unknown_fields = true,
    }) catch return reject("configuration must be {\"header\": string, \"value\": string, \"deny_prefix\"?: string}");
    if (parsed.header.len == 0) return reject("\"header\" must not be empty");
    // The parsed strings point into the bump heap, which the next call reuses: copy them out.
    var at: usize = 0;
    header_name = copyInto(&config_bytes, &at, parsed.header) orelse return reject("configuration too long");
    header_value = copyInto(&config_bytes, &at, parsed.value) orelse return reject("configuration too long");
    deny_prefix = copyInto(&config_bytes, &at, parsed.deny_prefix) orelse return reject("configuration too long");
    return &configured;
}

fn copyInto(buf: []u8, at: *usize, s: []const u8) ?[]const u8 {
    if (at.* + s.len > buf.len) return null;
    const out = buf[at.* .. at.* + s.len];
    @memcpy(out, s);
    at.* += s.len;
    return out;
}

fn reject(message: []const u8) *Configured {
    configured = .{ .is_err = 1, .err = str(message) };
    return &configured;
}

fn onRequest(ptr: [*]const Header, len: usize) callconv(.c) *Action {
    const head = ptr[0..len];
    if (deny_prefix.len > 0) {
        for (head) |h| {
            if (std.mem.eql(u8, slice(h.name), ":path") and std.mem.startsWith(u8, slice(h.value), deny_prefix)) {
                const msg = "denied by path prefix";
                log(.warn, "tag", 3, msg, msg.len);
                action = .{ .tag = 1, .payload = .{ .reply = .{
                    .status = 403,
                    .headers = empty_headers,
                    .body = .{ .ptr = "forbidden\n", .len = 10 },
                } } };
                return &action;
            }
        }
    }
    one_header[0] = .{ .name = str(header_name), .value = str(header_value) };
    action = .{ .tag = 0, .payload = .{ .edits = .{
        .remove = empty_strs,
        .set = .{ .ptr = &one_header, .len = 1 },
        .add = empty_headers,
    } } };
    return &action;
}

fn onResponse(_: [*]const Header, _: usize) callconv(.c) *Action {
    one_header[0] = .{ .name = str("x-tagged-by"), .value = str("zig-component") };
    action = .{ .tag = 0, .payload = .{ .edits = .{
        .remove = empty_strs,
        .set = empty_headers,
        .add = .{ .ptr = &one_header, .len = 1 },
    } } };
    return &action;
}

// option<callout-response> flattened: is-some, status, headers (ptr, len), body (ptr, len)
fn onCalloutResponse(_: u32, _: u32, _: usize, _: usize, _: usize, _: usize) callconv(.c) *Action {
    action = .{ .tag = 0, .payload = .{ .edits = .{ .remove = empty_strs, .set = empty_headers, .add = empty_headers } } };
    return &action;
}

comptime {
    @export(&cabiRealloc, .{ .name = "cabi_realloc" });
    @export(&configure, .{ .name = "configure" });
    @export(&onRequest, .{ .name = "on-request" });
    @export(&onResponse, .{ .name = "on-response" });
    @export(&onCalloutResponse, .{ .name = "on-callout-response" });
    @export(&postReturn, .{ .name = "cabi_post_configure" });
    @export(&postReturn, .{ .name = "cabi_post_on-request" });
    @export(&postReturn, .{ .name = "cabi_post_on-response" });
    @export(&postReturn, .{ .name = "cabi_post_on-callout-response" });
}
