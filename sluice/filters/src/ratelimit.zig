//! ratelimit.wasm: token buckets per (rule, key) in proxy shared data.
//!
//! Bucket value (16 bytes, little-endian): tokens in fixed point (1 token = 1e9 units) as u64, then
//! the last refill time in ns as u64. Updates are get + set(cas), retried on CAS_MISMATCH, so the
//! limit holds across concurrent streams and across VMs sharing a vm_id.
//! Idle buckets are deleted on a tick through sluice's foreign functions
//! `sluice_shared_data_keys` / `sluice_shared_data_delete` (skipped on hosts without them).
//!
//! `backend: redis` keeps the buckets in Redis instead (one per rule and key, fleet-wide): each
//! request runs `bucket_script` once (EVALSHA, EVAL after a NOSCRIPT) through Higress's Redis
//! host calls, and the request waits for the answer. When Redis fails, `on_backend_failure`
//! decides (local: the host-wide shared-data buckets above; allow; deny), a WARN line says so once,
//! and Redis is tried again every `retry_interval_ms`; the first answer ends the degradation.
const std = @import("std");
const pw = @import("proxy_wasm");

pub const panic = pw.panic;
comptime {
    _ = pw;
}

const unit: u64 = 1_000_000_000; // fixed-point units per token
const max_burst: u64 = 1_000_000_000;
const max_retries = 1000;

const KeyKind = enum { source, header };
const Backend = enum { local, redis };
const OnFailure = enum { local, allow, deny };

/// Token buckets in Redis for every rule at once, all or nothing (a denied request takes no
/// token anywhere). KEYS[i]: the bucket of rule i; ARGV[2i-1], ARGV[2i]: its rate (requests per
/// second x1000) and burst. Time is Redis's own clock, the same for the whole fleet. Returns
/// {allowed 1|0, remaining, reset seconds, index of the deciding rule}.
const bucket_script =
    \\local t = redis.call('TIME')
    \\local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    \\local level = {}
    \\for i = 1, #KEYS do
    \\  local rate = tonumber(ARGV[2 * i - 1]) / 1000
    \\  local burst = tonumber(ARGV[2 * i])
    \\  local v = redis.call('HMGET', KEYS[i], 't', 'ts')
    \\  local tk = tonumber(v[1]) or burst
    \\  local ts = tonumber(v[2]) or now
    \\  if now > ts then tk = math.min(burst, tk + (now - ts) * rate / 1000000) end
    \\  if tk < 1 then return {0, 0, math.max(1, math.ceil((1 - tk) / rate)), i - 1} end
    \\  level[i] = tk
    \\end
    \\local rem, reset, which = -1, 0, 0
    \\for i = 1, #KEYS do
    \\  local rate = tonumber(ARGV[2 * i - 1]) / 1000
    \\  local burst = tonumber(ARGV[2 * i])
    \\  local tk = level[i] - 1
    \\  redis.call('HSET', KEYS[i], 't', tk, 'ts', now)
    \\  redis.call('PEXPIRE', KEYS[i], math.ceil((burst - tk) / rate * 1000) + 1000)
    \\  local r = math.floor(tk)
    \\  local rs = 0
    \\  if tk < 1 then rs = math.ceil((1 - tk) / rate) end
    \\  if rem < 0 or r < rem or (r == rem and rs > reset) then rem, reset, which = r, rs, i - 1 end
    \\end
    \\return {1, rem, reset, which}
;

const Rule = struct {
    name: []const u8,
    rate_milli: u64, // requests per second, x1000
    burst: u64,
    kind: KeyKind,
    header: []const u8 = "",
};

pub const Root = struct {
    arena: std.heap.ArenaAllocator = std.heap.ArenaAllocator.init(pw.allocator),
    rules: []const Rule = &.{},
    cleanup_interval_ms: u64 = 10_000,
    idle_timeout_ns: u64 = 60 * unit,
    allowed: u32 = 0,
    denied: u32 = 0,
    backend_failures: u32 = 0,
    fallbacks: u32 = 0,
    cleanup_unsupported: bool = false,
    backend: Backend = .local,
    redis_cluster: []const u8 = "",
    redis_timeout_ms: u32 = 100,
    retry_interval_ns: u64 = 500 * 1_000_000,
    key_prefix: []const u8 = "sluice:rl:",
    on_failure: OnFailure = .local,
    script_sha: [40]u8 = undefined,
    redis_ready: bool = false,
    degraded: bool = false,
    retry_at: u64 = 0,

    pub fn init(self: *Root, _: u32) void {
        self.allowed = pw.defineMetric(.counter, "ratelimit_allowed");
        self.denied = pw.defineMetric(.counter, "ratelimit_denied");
    }

    pub fn deinit(self: *Root) void {
        self.arena.deinit();
    }

    pub fn configure(self: *Root, bytes: []const u8) bool {
        _ = self.arena.reset(.free_all);
        var reader = pw.ConfigReader{ .alloc = self.arena.allocator() };
        self.parseConfig(&reader, bytes) catch {
            reader.report("ratelimit");
            return false;
        };
        pw.setTickPeriod(@intCast(self.cleanup_interval_ms));
        if (self.backend == .redis) {
            // Defined only with a backend that can fail (a local-only filter reports what it did before).
            if (self.backend_failures == 0) self.backend_failures = pw.defineMetric(.counter, "ratelimit_backend_failures");
            if (self.fallbacks == 0) self.fallbacks = pw.defineMetric(.counter, "ratelimit_fallback_decisions");
            var digest: [20]u8 = undefined;
            std.crypto.hash.Sha1.hash(bucket_script, &digest, .{});
            self.script_sha = std.fmt.bytesToHex(digest, .lower);
            self.redis_ready = false;
            self.degraded = false;
            if (!self.readyRedis()) self.failed("the cluster cannot be initialised");
        }
        return true;
    }

    /// proxy_redis_init for the configured cluster (again after a failure).
    fn readyRedis(self: *Root) bool {
        if (!self.redis_ready) self.redis_ready = pw.redisInit(self.redis_cluster, "", "", self.redis_timeout_ms) == .ok;
        return self.redis_ready;
    }

    /// Whether this request should ask Redis: always while healthy; once per retry interval when degraded.
    fn tryRedis(self: *Root) bool {
        if (!self.degraded) return true;
        const t = pw.now();
        if (t < self.retry_at) return false;
        self.retry_at = t + self.retry_interval_ns;
        return self.readyRedis();
    }

    fn failed(self: *Root, reason: []const u8) void {
        pw.incrementMetric(self.backend_failures, 1);
        self.retry_at = pw.now() + self.retry_interval_ns;
        if (self.degraded) return;
        self.degraded = true;
        const mode = switch (self.on_failure) {
            .local => "the host-wide buckets (on_backend_failure: local)",
            .allow => "allowing requests (on_backend_failure: allow)",
            .deny => "denying requests (on_backend_failure: deny)",
        };
        pw.logParts(.warn, &.{ "ratelimit: redis cluster ", self.redis_cluster, " failed (", reason, "); falling back to ", mode });
    }

    fn answered(self: *Root) void {
        if (!self.degraded) return;
        self.degraded = false;
        pw.logParts(.info, &.{ "ratelimit: redis cluster ", self.redis_cluster, " answers again; fleet-wide limits restored" });
    }

    fn parseConfig(self: *Root, r: *pw.ConfigReader, bytes: []const u8) !void {
        const top = try r.parse(bytes);
        if (top != .object) return r.fail(&.{"configuration must be a JSON object"});
        const a = r.alloc;
        if (top.object.get("rules")) |rules_v| {
            const obj = try r.object(top, "configuration", &.{ "rules", "cleanup_interval_s", "idle_timeout_s", "backend", "redis", "on_backend_failure" });
            const items = try r.array(rules_v, "rules");
            if (items.len == 0) return r.fail(&.{"rules must not be empty"});
            const rules = a.alloc(Rule, items.len) catch return r.oom();
            for (items, 0..) |item, i| {
                const what = std.mem.concat(a, u8, &.{ "rules[", pw.itoa(i), "]" }) catch return r.oom();
                const o = try r.object(item, what, &.{ "name", "requests_per_second", "burst", "key" });
                rules[i] = try parseRule(r, o, what, i);
                for (rules[0..i]) |prev| {
                    if (std.mem.eql(u8, prev.name, rules[i].name)) return r.fail(&.{ what, ": duplicate rule name \"", prev.name, "\"" });
                }
            }
            self.rules = rules;
            try self.parseCommon(r, obj);
        } else {
            const obj = try r.object(top, "configuration", &.{ "name", "requests_per_second", "burst", "key", "cleanup_interval_s", "idle_timeout_s", "backend", "redis", "on_backend_failure" });
            const rules = a.alloc(Rule, 1) catch return r.oom();
            rules[0] = try parseRule(r, obj, "configuration", 0);
            self.rules = rules;
            try self.parseCommon(r, obj);
        }
    }

    fn parseCommon(self: *Root, r: *pw.ConfigReader, obj: std.json.ObjectMap) !void {
        if (obj.get("cleanup_interval_s")) |v| {
            self.cleanup_interval_ms = try r.fixed(v, "cleanup_interval_s", 3);
            if (self.cleanup_interval_ms > 86_400_000) return r.fail(&.{"cleanup_interval_s must be at most 86400"});
        }
        if (obj.get("idle_timeout_s")) |v| {
            const ms = try r.fixed(v, "idle_timeout_s", 3);
            if (ms == 0 or ms > 86_400_000) return r.fail(&.{"idle_timeout_s must be positive and at most 86400"});
            self.idle_timeout_ns = ms * 1_000_000;
        }
        self.backend = .local;
        if (obj.get("backend")) |v| {
            const name = try r.string(v, "backend");
            self.backend = std.meta.stringToEnum(Backend, name) orelse return r.fail(&.{ "backend: unknown backend \"", name, "\" (local or redis)" });
        }
        if (obj.get("on_backend_failure")) |v| {
            const name = try r.string(v, "on_backend_failure");
            self.on_failure = std.meta.stringToEnum(OnFailure, name) orelse return r.fail(&.{ "on_backend_failure: unknown value \"", name, "\" (local, allow or deny)" });
        }
        if (obj.get("redis")) |v| {
            const o = try r.object(v, "redis", &.{ "cluster", "timeout_ms", "retry_interval_ms", "key_prefix" });
            if (o.get("cluster")) |c| self.redis_cluster = try r.nonEmptyString(c, "redis.cluster");
            if (o.get("timeout_ms")) |t| {
                self.redis_timeout_ms = @intCast(try r.uint(t, "redis.timeout_ms", 60_000));
                if (self.redis_timeout_ms == 0) return r.fail(&.{"redis.timeout_ms must be at least 1"});
            }
            if (o.get("retry_interval_ms")) |t| self.retry_interval_ns = (try r.uint(t, "redis.retry_interval_ms", 3_600_000)) * 1_000_000;
            if (o.get("key_prefix")) |k| self.key_prefix = try r.string(k, "redis.key_prefix");
        }
        if (self.backend == .redis and self.redis_cluster.len == 0) return r.fail(&.{"backend redis needs redis.cluster (a cluster of type redis)"});
    }

    /// Deletes buckets idle longer than idle_timeout_s (CAS-guarded: a concurrent update wins).
    pub fn onTick(self: *Root) void {
        if (self.cleanup_unsupported) return;
        const listed = pw.callForeignFunction("sluice_shared_data_keys", "rl:");
        if (listed.status == .not_found) {
            self.cleanup_unsupported = true;
            pw.logRaw(.info, "ratelimit: host has no sluice_shared_data_keys; idle bucket cleanup disabled");
            return;
        }
        if (listed.status != .ok) return;
        const keys = pw.parsePairs(pw.scratch(), listed.data) catch return;
        const now = pw.now();
        for (keys) |pair| {
            const key = pair[0];
            const got = pw.getSharedData(key) orelse continue;
            if (got.value.len != 16) continue;
            const last = std.mem.readInt(u64, got.value[8..16], .little);
            if (now < last or now - last < self.idle_timeout_ns) continue;
            const args = pw.scratch().alloc(u8, 4 + key.len) catch return;
            std.mem.writeInt(u32, args[0..4], got.cas, .little);
            @memcpy(args[4..], key);
            const del = pw.callForeignFunction("sluice_shared_data_delete", args);
            if (del.status == .not_found and pw.getSharedData(key) != null) {
                // NOT_FOUND for an existing key: the function itself is missing.
                self.cleanup_unsupported = true;
                return;
            }
        }
    }
};

fn parseRule(r: *pw.ConfigReader, o: std.json.ObjectMap, what: []const u8, index: usize) !Rule {
    const a = r.alloc;
    var rule = Rule{ .name = "", .rate_milli = 0, .burst = 0, .kind = .source };
    if (o.get("name")) |v| {
        rule.name = try r.nonEmptyString(v, pw.concat(&.{ what, ".name" }));
        if (std.mem.indexOfScalar(u8, rule.name, ':') != null) return r.fail(&.{ what, ".name must not contain ':'" });
    } else {
        rule.name = a.dupe(u8, pw.itoa(index)) catch return r.oom();
    }
    const rps = o.get("requests_per_second") orelse return r.fail(&.{ what, ": requests_per_second is required" });
    rule.rate_milli = try r.fixed(rps, pw.concat(&.{ what, ".requests_per_second" }), 3);
    if (rule.rate_milli == 0) return r.fail(&.{ what, ".requests_per_second must be positive (at least 0.001)" });
    if (rule.rate_milli > 1_000_000_000) return r.fail(&.{ what, ".requests_per_second must be at most 1000000" });
    if (o.get("burst")) |v| {
        rule.burst = try r.uint(v, pw.concat(&.{ what, ".burst" }), max_burst);
        if (rule.burst == 0) return r.fail(&.{ what, ".burst must be at least 1" });
    } else {
        rule.burst = @max(1, (rule.rate_milli + 999) / 1000);
    }
    if (o.get("key")) |v| {
        const key = try r.nonEmptyString(v, pw.concat(&.{ what, ".key" }));
        if (std.mem.eql(u8, key, "source")) {
            rule.kind = .source;
        } else if (std.mem.eql(u8, key, "subject")) {
            rule.kind = .header;
            rule.header = "x-auth-subject";
        } else if (std.mem.startsWith(u8, key, "header:") and key.len > 7) {
            rule.kind = .header;
            rule.header = pw.lower(a, key[7..]) catch return r.oom();
        } else if (std.mem.startsWith(u8, key, "subject:") and key.len > 8) {
            rule.kind = .header;
            rule.header = pw.lower(a, key[8..]) catch return r.oom();
        } else {
            return r.fail(&.{ what, ".key: unknown key \"", key, "\" (source, header:<name>, subject or subject:<header>)" });
        }
    }
    return rule;
}

/// IP part of "ip:port", "[v6]:port" or a bare address.
fn ipPart(addr: []const u8) []const u8 {
    if (addr.len > 0 and addr[0] == '[') {
        const end = std.mem.indexOfScalar(u8, addr, ']') orelse return addr;
        return addr[1..end];
    }
    if (std.mem.count(u8, addr, ":") == 1) return addr[0..std.mem.indexOfScalar(u8, addr, ':').?];
    return addr;
}

fn keyValue(rule: *const Rule) []const u8 {
    const v = switch (rule.kind) {
        .source => ipPart(pw.getProperty(&.{ "source", "address" }) orelse ""),
        .header => pw.getHeader(.request_headers, rule.header) orelse "",
    };
    return if (v.len == 0) "-" else v;
}

fn ceilDiv(a: u64, b: u64) u64 {
    return a / b + @intFromBool(a % b != 0);
}

const Outcome = struct { allowed: bool, remaining: u64, reset_s: u64 };

/// Takes one token from the bucket of `rule` for `value`, exactly (CAS loop).
fn take(rule: *const Rule, value: []const u8) Outcome {
    const key = pw.concat(&.{ "rl:", rule.name, ":", value });
    const full = rule.burst * unit;
    var attempt: u32 = 0;
    while (attempt < max_retries) : (attempt += 1) {
        const now = pw.now();
        var tokens = full;
        var last = now;
        var cas: u32 = 0;
        if (pw.getSharedData(key)) |got| {
            cas = got.cas;
            if (got.value.len == 16) {
                tokens = @min(std.mem.readInt(u64, got.value[0..8], .little), full);
                last = std.mem.readInt(u64, got.value[8..16], .little);
                if (now > last) {
                    const add: u128 = @as(u128, now - last) * rule.rate_milli / 1000;
                    tokens = @intCast(@min(@as(u128, tokens) + add, full));
                }
            }
        }
        if (tokens < unit) {
            // Denied: nothing to write (the refill is recomputed from `last` next time).
            const wait_ns = ceilDiv((unit - tokens) * 1000, rule.rate_milli);
            return .{ .allowed = false, .remaining = 0, .reset_s = @max(1, ceilDiv(wait_ns, unit)) };
        }
        tokens -= unit;
        var buf: [16]u8 = undefined;
        std.mem.writeInt(u64, buf[0..8], tokens, .little);
        std.mem.writeInt(u64, buf[8..16], @max(now, last), .little);
        switch (pw.setSharedData(key, &buf, cas)) {
            .ok => {
                const reset_s = if (tokens >= unit) 0 else ceilDiv(ceilDiv((unit - tokens) * 1000, rule.rate_milli), unit);
                return .{ .allowed = true, .remaining = tokens / unit, .reset_s = reset_s };
            },
            .cas_mismatch => continue,
            else => break,
        }
    }
    pw.logParts(.warn, &.{ "ratelimit: could not update bucket ", key, "; request allowed" });
    return .{ .allowed = true, .remaining = rule.burst, .reset_s = 0 };
}

/// Gives back the token `take` took (a later rule denied the request), so that a denied request
/// costs nothing in any bucket.
fn refund(rule: *const Rule, value: []const u8) void {
    const key = pw.concat(&.{ "rl:", rule.name, ":", value });
    const full = rule.burst * unit;
    var attempt: u32 = 0;
    while (attempt < max_retries) : (attempt += 1) {
        const got = pw.getSharedData(key) orelse return; // deleted meanwhile: it is full anyway
        if (got.value.len != 16) return;
        var buf: [16]u8 = got.value[0..16].*;
        const tokens = std.mem.readInt(u64, buf[0..8], .little);
        std.mem.writeInt(u64, buf[0..8], @min(tokens + unit, full), .little);
        if (pw.setSharedData(key, &buf, got.cas) != .cas_mismatch) return;
    }
}

pub const Stream = struct {
    root: *Root = undefined,
    decided: bool = false,
    denied: bool = false,
    limit: u64 = 0,
    remaining: u64 = 0,
    reset_s: u64 = 0,
    waiting: bool = false,
    token: u32 = 0,
    eval_sent: bool = false,

    pub fn init(self: *Stream, root: *Root, _: u32) void {
        self.root = root;
    }

    pub fn onRequestHeaders(self: *Stream, _: u32, _: bool) pw.Action {
        const r = self.root;
        if (r.backend == .local) return self.decideLocal();
        if (r.tryRedis()) {
            if (self.askRedis(false)) return .pause;
            r.failed("the call was refused");
        }
        return self.fallback();
    }

    /// One script call for every rule; the answer arrives in onRedisCallResponse.
    fn askRedis(self: *Stream, full_script: bool) bool {
        const r = self.root;
        const a = pw.scratch();
        const n = r.rules.len;
        const args = a.alloc([]const u8, 3 + 3 * n) catch return false;
        args[0] = if (full_script) "EVAL" else "EVALSHA";
        args[1] = if (full_script) bucket_script else &r.script_sha;
        args[2] = pw.itoa(n);
        for (r.rules, 0..) |*rule, i| {
            args[3 + i] = pw.concat(&.{ r.key_prefix, rule.name, ":", keyValue(rule) });
            args[3 + n + 2 * i] = pw.itoa(rule.rate_milli);
            args[4 + n + 2 * i] = pw.itoa(rule.burst);
        }
        self.token = pw.redisCall(r.redis_cluster, args) catch return false;
        self.waiting = true;
        return true;
    }

    pub fn onRedisCallResponse(self: *Stream, token: u32, status: i32, reply: []const u8) void {
        if (!self.waiting or token != self.token) return;
        self.waiting = false;
        const r = self.root;
        if (status != 0) {
            r.failed(if (status == 2) "timeout" else "unreachable");
            return self.proceed(self.fallback());
        }
        switch (pw.parseResp(reply)) {
            .integers => |v| if (v.len == 4 and v[3] >= 0 and v[3] < r.rules.len) {
                r.answered();
                return self.proceed(self.applyRedis(v));
            },
            .err => |e| if (std.mem.startsWith(u8, e, "NOSCRIPT") and !self.eval_sent) {
                // Redis restarted or flushed its script cache: send the script itself, once.
                self.eval_sent = true;
                if (self.askRedis(true)) return;
            } else {
                r.failed(e);
                return self.proceed(self.fallback());
            },
            else => {},
        }
        r.failed("unexpected reply");
        self.proceed(self.fallback());
    }

    fn proceed(_: *Stream, action: pw.Action) void {
        if (action == .@"continue") pw.continueStream(.request);
    }

    fn applyRedis(self: *Stream, v: []const i64) pw.Action {
        const rule = &self.root.rules[@intCast(v[3])];
        const remaining: u64 = @intCast(@max(v[1], 0));
        const reset_s: u64 = @intCast(@max(v[2], 0));
        if (v[0] != 1) return self.deny(rule.burst, reset_s);
        pw.incrementMetric(self.root.allowed, 1);
        self.decided = true;
        self.limit = rule.burst;
        self.remaining = remaining;
        self.reset_s = reset_s;
        return .@"continue";
    }

    fn fallback(self: *Stream) pw.Action {
        const r = self.root;
        pw.incrementMetric(r.fallbacks, 1);
        switch (r.on_failure) {
            .local => return self.decideLocal(),
            .allow => {
                pw.incrementMetric(r.allowed, 1);
                return .@"continue";
            },
            .deny => return self.deny(r.rules[0].burst, 1),
        }
    }

    fn deny(self: *Stream, limit: u64, reset_s: u64) pw.Action {
        self.denied = true;
        pw.incrementMetric(self.root.denied, 1);
        const retry = pw.itoa(reset_s);
        pw.sendLocalResponse(429, "ratelimit_denied", "rate limited", &.{
            .{ "retry-after", retry },
            .{ "ratelimit-limit", pw.itoa(limit) },
            .{ "ratelimit-remaining", "0" },
            .{ "ratelimit-reset", retry },
        });
        return .pause;
    }

    /// The host-wide buckets in shared data (backend local, and the `local` fallback).
    fn decideLocal(self: *Stream) pw.Action {
        var best: ?Outcome = null;
        var best_rule: *const Rule = undefined;
        for (self.root.rules, 0..) |*rule, i| {
            const out = take(rule, keyValue(rule));
            if (!out.allowed) {
                for (self.root.rules[0..i]) |*earlier| refund(earlier, keyValue(earlier));
                return self.deny(rule.burst, out.reset_s);
            }
            if (best == null or out.remaining < best.?.remaining or
                (out.remaining == best.?.remaining and out.reset_s > best.?.reset_s))
            {
                best = out;
                best_rule = rule;
            }
        }
        pw.incrementMetric(self.root.allowed, 1);
        if (best) |b| {
            self.decided = true;
            self.limit = best_rule.burst;
            self.remaining = b.remaining;
            self.reset_s = b.reset_s;
        }
        return .@"continue";
    }

    pub fn onResponseHeaders(self: *Stream, _: u32, _: bool) pw.Action {
        if (self.denied or !self.decided) return .@"continue";
        pw.replaceHeader(.response_headers, "ratelimit-limit", pw.itoa(self.limit));
        pw.replaceHeader(.response_headers, "ratelimit-remaining", pw.itoa(self.remaining));
        pw.replaceHeader(.response_headers, "ratelimit-reset", pw.itoa(self.reset_s));
        return .@"continue";
    }
};
