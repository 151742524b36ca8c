//! sluice's proxy-wasm binding for Zig filters (ABI 0.2.1).
//!
//! A filter is one Zig file (the root module) that imports this module as `proxy_wasm` and declares
//! two types:
//!
//!     pub const Root = struct {
//!         pub fn init(self: *Root, context_id: u32) void;                  // optional
//!         pub fn configure(self: *Root, config: []const u8) bool;          // optional, false = reject
//!         pub fn onTick(self: *Root) void;                                  // optional
//!     };
//!     pub const Stream = struct {
//!         pub fn init(self: *Stream, root: *Root, context_id: u32) void;   // optional
//!         pub fn onRequestHeaders(self: *Stream, num_headers: u32, end_of_stream: bool) Action;
//!         pub fn onResponseHeaders(self: *Stream, num_headers: u32, end_of_stream: bool) Action;
//!         pub fn onHttpCallResponse(self: *Stream, token: u32, num_headers: u32, body_size: u32,
//!                                   num_trailers: u32) void;
//!         pub fn onRedisCallResponse(self: *Stream, token: u32, status: i32, reply: []const u8) void; // optional
//!         pub fn onLog(self: *Stream) void;
//!         pub fn deinit(self: *Stream) void;
//!     };
//!
//! Every method is optional; a missing stream callback is not exported (the host then continues).
//! Both types are created as `.{}` (every field needs a default) before `init` runs.
//!
//! Memory: bytes the host hands to the module (header values, configuration, shared data, call
//! results) are allocated from a scratch arena that is reset when the outermost callback returns.
//! Anything a filter keeps longer must be copied into `allocator` (or an arena built on it).

const std = @import("std");
const root = @import("root");

// ---------------------------------------------------------------------------------------------
// Enumerations (reference section 3)

pub const Status = enum(u32) {
    ok = 0,
    not_found = 1,
    bad_argument = 2,
    serialization_failure = 3,
    parse_failure = 4,
    bad_expression = 5,
    invalid_memory_access = 6,
    empty = 7,
    cas_mismatch = 8,
    result_mismatch = 9,
    internal_failure = 10,
    broken_connection = 11,
    unimplemented = 12,
    _,
};

pub const LogLevel = enum(u32) { trace = 0, debug = 1, info = 2, warn = 3, err = 4, critical = 5 };

pub const MapType = enum(u32) {
    request_headers = 0,
    request_trailers = 1,
    response_headers = 2,
    response_trailers = 3,
    grpc_initial_metadata = 4,
    grpc_trailing_metadata = 5,
    http_call_response_headers = 6,
    http_call_response_trailers = 7,
};

pub const BufferType = enum(u32) {
    request_body = 0,
    response_body = 1,
    downstream_data = 2,
    upstream_data = 3,
    http_call_response_body = 4,
    grpc_message = 5,
    vm_configuration = 6,
    plugin_configuration = 7,
    foreign_function_arguments = 8,
    redis_call_response = 9, // Higress ABI 0.2.100
};

pub const StreamType = enum(u32) { request = 0, response = 1, downstream = 2, upstream = 3 };

pub const MetricType = enum(u32) { counter = 0, gauge = 1, histogram = 2 };

pub const Action = enum(u32) { @"continue" = 0, pause = 1 };

pub const Error = error{ HostError, OutOfMemory };

/// One header (or any pairs-map entry).
pub const Pair = struct { []const u8, []const u8 };

// ---------------------------------------------------------------------------------------------
// Host imports (reference section 1). Only what this binding uses.

const hs = struct {
    extern "env" fn proxy_log(level: u32, ptr: [*]const u8, len: usize) u32;
    extern "env" fn proxy_get_current_time_nanoseconds(out: *u64) u32;
    extern "env" fn proxy_set_tick_period_milliseconds(period: u32) u32;
    extern "env" fn proxy_get_buffer_bytes(t: u32, start: u32, max: u32, out_ptr: *?[*]u8, out_len: *usize) u32;
    extern "env" fn proxy_get_header_map_pairs(t: u32, out_ptr: *?[*]u8, out_len: *usize) u32;
    extern "env" fn proxy_get_header_map_value(t: u32, kp: [*]const u8, kl: usize, out_ptr: *?[*]u8, out_len: *usize) u32;
    extern "env" fn proxy_add_header_map_value(t: u32, kp: [*]const u8, kl: usize, vp: [*]const u8, vl: usize) u32;
    extern "env" fn proxy_replace_header_map_value(t: u32, kp: [*]const u8, kl: usize, vp: [*]const u8, vl: usize) u32;
    extern "env" fn proxy_remove_header_map_value(t: u32, kp: [*]const u8, kl: usize) u32;
    extern "env" fn proxy_get_property(pp: [*]const u8, pl: usize, out_ptr: *?[*]u8, out_len: *usize) u32;
    extern "env" fn proxy_continue_stream(t: u32) u32;
    extern "env" fn proxy_send_local_response(status: u32, dp: [*]const u8, dl: usize, bp: [*]const u8, bl: usize, hp: [*]const u8, hl: usize, grpc: i32) u32;
    extern "env" fn proxy_http_call(up: [*]const u8, ul: usize, hp: [*]const u8, hl: usize, bp: [*]const u8, bl: usize, tp: [*]const u8, tl: usize, timeout_ms: u32, out_token: *u32) u32;
    extern "env" fn proxy_set_effective_context(id: u32) u32;
    extern "env" fn proxy_get_shared_data(kp: [*]const u8, kl: usize, out_ptr: *?[*]u8, out_len: *usize, out_cas: *u32) u32;
    extern "env" fn proxy_set_shared_data(kp: [*]const u8, kl: usize, vp: [*]const u8, vl: usize, cas: u32) u32;
    extern "env" fn proxy_define_metric(t: u32, np: [*]const u8, nl: usize, out_id: *u32) u32;
    extern "env" fn proxy_increment_metric(id: u32, offset: i64) u32;
    extern "env" fn proxy_record_metric(id: u32, value: u64) u32;
    extern "env" fn proxy_call_foreign_function(np: [*]const u8, nl: usize, ap: [*]const u8, al: usize, out_ptr: *?[*]u8, out_len: *usize) u32;
    // Higress ABI 0.2.100 (imported only by filters that use Redis).
    extern "env" fn proxy_redis_init(cp: [*]const u8, cl: usize, up: [*]const u8, ul: usize, pp: [*]const u8, pl: usize, timeout_ms: u32) u32;
    extern "env" fn proxy_redis_call(cp: [*]const u8, cl: usize, qp: [*]const u8, ql: usize, out_token: *u32) u32;
};

fn st(raw: u32) Status {
    return @enumFromInt(raw);
}

fn slice(ptr: ?[*]u8, len: usize) []const u8 {
    return if (ptr) |p| p[0..len] else &.{};
}

// ---------------------------------------------------------------------------------------------
// Memory

/// Long-lived allocator (configuration, contexts).
pub const allocator: std.mem.Allocator = std.heap.wasm_allocator;

var scratch_state = std.heap.ArenaAllocator.init(std.heap.wasm_allocator);
var depth: u32 = 0;

/// Short-lived allocator: everything allocated here is freed when the current host callback returns.
pub fn scratch() std.mem.Allocator {
    return scratch_state.allocator();
}

fn enter() void {
    depth += 1;
}

fn leave() void {
    depth -= 1;
    if (depth == 0) _ = scratch_state.reset(.{ .retain_with_limit = 64 * 1024 });
}

export fn proxy_on_memory_allocate(size: usize) ?[*]u8 {
    const buf = scratch().alloc(u8, if (size == 0) 1 else size) catch return null;
    return buf.ptr;
}

export fn proxy_abi_version_0_2_1() void {}

// ---------------------------------------------------------------------------------------------
// Logging, time, timers

pub fn logRaw(level: LogLevel, msg: []const u8) void {
    _ = hs.proxy_log(@intFromEnum(level), msg.ptr, msg.len);
}

/// Formats into the scratch arena and logs the line.
pub fn log(level: LogLevel, comptime fmt: []const u8, args: anytype) void {
    const msg = std.fmt.allocPrint(scratch(), fmt, args) catch return logRaw(level, fmt);
    logRaw(level, msg);
}

/// Wall-clock time in nanoseconds since the Unix epoch (the host may cache it per callback).
pub fn now() u64 {
    var t: u64 = 0;
    _ = hs.proxy_get_current_time_nanoseconds(&t);
    return t;
}

/// Tick period of the current root context; 0 stops the timer.
pub fn setTickPeriod(ms: u32) void {
    _ = hs.proxy_set_tick_period_milliseconds(ms);
}

/// Fills `buf` with random bytes from WASI `random_get`.
pub fn randomBytes(buf: []u8) void {
    if (std.os.wasi.random_get(buf.ptr, buf.len) != .SUCCESS) @memset(buf, 0);
}

pub fn randomInt() u64 {
    var b: [8]u8 = undefined;
    randomBytes(&b);
    return std.mem.readInt(u64, &b, .little);
}

// ---------------------------------------------------------------------------------------------
// Buffers, configuration, properties

/// `[start, start+max)` of a buffer; null when the buffer is not available now.
pub fn getBufferBytes(t: BufferType, start: u32, max: u32) ?[]const u8 {
    var p: ?[*]u8 = null;
    var n: usize = 0;
    if (st(hs.proxy_get_buffer_bytes(@intFromEnum(t), start, max, &p, &n)) != .ok) return null;
    return slice(p, n);
}

/// The plugin configuration (valid inside `configure`).
pub fn pluginConfiguration() []const u8 {
    return getBufferBytes(.plugin_configuration, 0, std.math.maxInt(u32)) orelse &.{};
}

/// A property by path segments, e.g. `&.{ "source", "address" }`.
pub fn getProperty(path: []const []const u8) ?[]const u8 {
    const joined = std.mem.join(scratch(), "\x00", path) catch return null;
    var p: ?[*]u8 = null;
    var n: usize = 0;
    if (st(hs.proxy_get_property(joined.ptr, joined.len, &p, &n)) != .ok) return null;
    return slice(p, n);
}

// ---------------------------------------------------------------------------------------------
// Header maps

/// First value of `name` (lower-case), or null.
pub fn getHeader(map: MapType, name: []const u8) ?[]const u8 {
    var p: ?[*]u8 = null;
    var n: usize = 0;
    if (st(hs.proxy_get_header_map_value(@intFromEnum(map), name.ptr, name.len, &p, &n)) != .ok) return null;
    return slice(p, n);
}

pub fn addHeader(map: MapType, name: []const u8, value: []const u8) void {
    _ = hs.proxy_add_header_map_value(@intFromEnum(map), name.ptr, name.len, value.ptr, value.len);
}

pub fn replaceHeader(map: MapType, name: []const u8, value: []const u8) void {
    _ = hs.proxy_replace_header_map_value(@intFromEnum(map), name.ptr, name.len, value.ptr, value.len);
}

pub fn removeHeader(map: MapType, name: []const u8) void {
    _ = hs.proxy_remove_header_map_value(@intFromEnum(map), name.ptr, name.len);
}

/// Every entry of a map, in order (slices point into the scratch arena).
pub fn getHeaders(map: MapType) []const Pair {
    var p: ?[*]u8 = null;
    var n: usize = 0;
    if (st(hs.proxy_get_header_map_pairs(@intFromEnum(map), &p, &n)) != .ok) return &.{};
    return parsePairs(scratch(), slice(p, n)) catch &.{};
}

/// Decodes the pairs wire format (reference section 4.1).
pub fn parsePairs(alloc: std.mem.Allocator, data: []const u8) ![]const Pair {
    if (data.len < 4) return &.{};
    const count = std.mem.readInt(u32, data[0..4], .little);
    if (count > data.len / 8) return error.HostError;
    const out = try alloc.alloc(Pair, count);
    var sizes: usize = 4;
    var pos: usize = 4 + @as(usize, count) * 8;
    for (out) |*pair| {
        const kl = std.mem.readInt(u32, data[sizes..][0..4], .little);
        const vl = std.mem.readInt(u32, data[sizes + 4 ..][0..4], .little);
        sizes += 8;
        if (pos + kl + vl + 2 > data.len) return error.HostError;
        pair.* = .{ data[pos .. pos + kl], data[pos + kl + 1 .. pos + kl + 1 + vl] };
        pos += kl + vl + 2;
    }
    return out;
}

/// Encodes pairs into the wire format.
pub fn serializePairs(alloc: std.mem.Allocator, pairs: []const Pair) ![]u8 {
    var size: usize = 4;
    for (pairs) |p| size += 8 + p[0].len + p[1].len + 2;
    const out = try alloc.alloc(u8, size);
    std.mem.writeInt(u32, out[0..4], @intCast(pairs.len), .little);
    var sizes: usize = 4;
    var pos: usize = 4 + pairs.len * 8;
    for (pairs) |p| {
        std.mem.writeInt(u32, out[sizes..][0..4], @intCast(p[0].len), .little);
        std.mem.writeInt(u32, out[sizes + 4 ..][0..4], @intCast(p[1].len), .little);
        sizes += 8;
        @memcpy(out[pos .. pos + p[0].len], p[0]);
        pos += p[0].len;
        out[pos] = 0;
        pos += 1;
        @memcpy(out[pos .. pos + p[1].len], p[1]);
        pos += p[1].len;
        out[pos] = 0;
        pos += 1;
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// Stream control

pub fn continueStream(t: StreamType) void {
    _ = hs.proxy_continue_stream(@intFromEnum(t));
}

/// Replies locally; the host sends it after the current callback returns.
pub fn sendLocalResponse(status: u32, details: []const u8, body: []const u8, headers: []const Pair) void {
    const h = serializePairs(scratch(), headers) catch &.{};
    _ = hs.proxy_send_local_response(status, details.ptr, details.len, body.ptr, body.len, h.ptr, h.len, -1);
}

pub fn setEffectiveContext(id: u32) Status {
    return st(hs.proxy_set_effective_context(id));
}

// ---------------------------------------------------------------------------------------------
// HTTP calls. Calls made through `httpCall` from a stream are routed back to that stream's
// `onHttpCallResponse` (with the stream made the effective context), if it still exists.

const Pending = struct { token: u32, stream: u32 };
var pending: std.ArrayListUnmanaged(Pending) = .empty;
var current_context: u32 = 0;

/// Starts a callout to `upstream`; returns the token. The response reaches the calling stream's
/// `onHttpCallResponse`.
pub fn httpCall(upstream: []const u8, headers: []const Pair, body: []const u8, trailers: []const Pair, timeout_ms: u32) Error!u32 {
    const h = try serializePairs(scratch(), headers);
    const t = try serializePairs(scratch(), trailers);
    var token: u32 = 0;
    const s = st(hs.proxy_http_call(upstream.ptr, upstream.len, h.ptr, h.len, body.ptr, body.len, t.ptr, t.len, timeout_ms, &token));
    if (s != .ok) return error.HostError;
    try pending.append(allocator, .{ .token = token, .stream = current_context });
    return token;
}

/// During `onHttpCallResponse`: the callout's response status (`:status`), 0 if unavailable.
pub fn httpCallResponseStatus() u32 {
    const v = getHeader(.http_call_response_headers, ":status") orelse return 0;
    return std.fmt.parseInt(u32, v, 10) catch 0;
}

// ---------------------------------------------------------------------------------------------
// Redis calls (Higress ABI 0.2.100). A command sent from a stream reaches that stream's
// `onRedisCallResponse(token, status, reply)` (status 0: `reply` is the RESP answer).

var redis_pending: std.ArrayListUnmanaged(Pending) = .empty;

/// Readies `cluster` (a `type: redis` cluster of the host) for `redisCall`; call it in `configure`.
pub fn redisInit(cluster: []const u8, username: []const u8, password: []const u8, timeout_ms: u32) Status {
    return st(hs.proxy_redis_init(cluster.ptr, cluster.len, username.ptr, username.len, password.ptr, password.len, timeout_ms));
}

/// Sends one command (arguments, RESP-encoded here); returns the token.
pub fn redisCall(cluster: []const u8, args: []const []const u8) Error!u32 {
    var out: std.ArrayListUnmanaged(u8) = .empty;
    const a = scratch();
    try out.appendSlice(a, "*");
    try out.appendSlice(a, itoa(args.len));
    try out.appendSlice(a, "\r\n");
    for (args) |arg| {
        try out.appendSlice(a, "$");
        try out.appendSlice(a, itoa(arg.len));
        try out.appendSlice(a, "\r\n");
        try out.appendSlice(a, arg);
        try out.appendSlice(a, "\r\n");
    }
    var token: u32 = 0;
    if (st(hs.proxy_redis_call(cluster.ptr, cluster.len, out.items.ptr, out.items.len, &token)) != .ok) return error.HostError;
    try redis_pending.append(allocator, .{ .token = token, .stream = current_context });
    return token;
}

/// A RESP reply, as far as filters need one: an integer, a (bulk or simple) string, an error,
/// nil, or an array of integers (what scripts return).
pub const RespReply = union(enum) {
    integer: i64,
    string: []const u8,
    err: []const u8,
    nil,
    integers: []const i64,
    other,
};

fn respLine(data: []const u8, pos: *usize) ?[]const u8 {
    const end = std.mem.indexOfPos(u8, data, pos.*, "\r\n") orelse return null;
    const line = data[pos.*..end];
    pos.* = end + 2;
    return line;
}

pub fn parseResp(data: []const u8) RespReply {
    var pos: usize = 0;
    const line = respLine(data, &pos) orelse return .other;
    if (line.len == 0) return .other;
    const rest = line[1..];
    switch (line[0]) {
        ':' => return .{ .integer = std.fmt.parseInt(i64, rest, 10) catch return .other },
        '+' => return .{ .string = rest },
        '-' => return .{ .err = rest },
        '$' => {
            const n = std.fmt.parseInt(i64, rest, 10) catch return .other;
            if (n < 0) return .nil;
            const size: usize = @intCast(n);
            if (pos + size > data.len) return .other;
            return .{ .string = data[pos .. pos + size] };
        },
        '*' => {
            const n = std.fmt.parseInt(i64, rest, 10) catch return .other;
            if (n < 0) return .nil;
            const items = scratch().alloc(i64, @intCast(n)) catch return .other;
            for (items) |*item| {
                const l = respLine(data, &pos) orelse return .other;
                if (l.len == 0 or l[0] != ':') return .other;
                item.* = std.fmt.parseInt(i64, l[1..], 10) catch return .other;
            }
            return .{ .integers = items };
        },
        else => return .other,
    }
}

// ---------------------------------------------------------------------------------------------
// Shared data

pub const SharedValue = struct { value: []const u8, cas: u32 };

/// null when the key does not exist.
pub fn getSharedData(key: []const u8) ?SharedValue {
    var p: ?[*]u8 = null;
    var n: usize = 0;
    var cas: u32 = 0;
    if (st(hs.proxy_get_shared_data(key.ptr, key.len, &p, &n, &cas)) != .ok) return null;
    return .{ .value = slice(p, n), .cas = cas };
}

/// `cas` 0 = unconditional. Returns .ok or .cas_mismatch (or another host status).
pub fn setSharedData(key: []const u8, value: []const u8, cas: u32) Status {
    return st(hs.proxy_set_shared_data(key.ptr, key.len, value.ptr, value.len, cas));
}

// ---------------------------------------------------------------------------------------------
// Metrics

pub fn defineMetric(t: MetricType, name: []const u8) u32 {
    var id: u32 = 0;
    if (st(hs.proxy_define_metric(@intFromEnum(t), name.ptr, name.len, &id)) != .ok) return 0;
    return id;
}

pub fn incrementMetric(id: u32, offset: i64) void {
    if (id != 0) _ = hs.proxy_increment_metric(id, offset);
}

/// Sets a gauge, or adds a sample to a histogram.
pub fn recordMetric(id: u32, value: u64) void {
    if (id != 0) _ = hs.proxy_record_metric(id, value);
}

// ---------------------------------------------------------------------------------------------
// Foreign functions

pub const ForeignResult = struct { status: Status, data: []const u8 };

pub fn callForeignFunction(name: []const u8, args: []const u8) ForeignResult {
    var p: ?[*]u8 = null;
    var n: usize = 0;
    const s = st(hs.proxy_call_foreign_function(name.ptr, name.len, args.ptr, args.len, &p, &n));
    return .{ .status = s, .data = if (s == .ok) slice(p, n) else &.{} };
}

// ---------------------------------------------------------------------------------------------
// Panics: log the message at critical level, then trap (the host applies the failure policy).

fn panicHandler(msg: []const u8, _: ?usize) noreturn {
    @branchHint(.cold);
    logRaw(.critical, msg);
    @trap();
}

/// Use in the filter's root file: `pub const panic = proxy_wasm.panic;`
pub const panic = struct {
    pub const call = panicHandler;
    pub fn sentinelMismatch(_: anytype, _: anytype) noreturn {
        panicHandler("sentinel mismatch", null);
    }
    pub fn unwrapError(_: anyerror) noreturn {
        panicHandler("attempt to unwrap error", null);
    }
    pub fn outOfBounds(_: usize, _: usize) noreturn {
        panicHandler("index out of bounds", null);
    }
    pub fn startGreaterThanEnd(_: usize, _: usize) noreturn {
        panicHandler("start index is larger than end index", null);
    }
    pub fn inactiveUnionField(_: anytype, _: anytype) noreturn {
        panicHandler("access of inactive union field", null);
    }
    pub fn sliceCastLenRemainder(_: usize) noreturn {
        panicHandler("slice length does not divide exactly", null);
    }
    pub fn reachedUnreachable() noreturn {
        panicHandler("reached unreachable code", null);
    }
    pub fn unwrapNull() noreturn {
        panicHandler("attempt to use null value", null);
    }
    pub fn castToNull() noreturn {
        panicHandler("cast causes pointer to be null", null);
    }
    pub fn incorrectAlignment() noreturn {
        panicHandler("incorrect alignment", null);
    }
    pub fn invalidErrorCode() noreturn {
        panicHandler("invalid error code", null);
    }
    pub fn castTruncatedData() noreturn {
        panicHandler("integer cast truncated bits", null);
    }
    pub fn negativeToUnsigned() noreturn {
        panicHandler("attempt to cast negative value to unsigned integer", null);
    }
    pub fn integerOverflow() noreturn {
        panicHandler("integer overflow", null);
    }
    pub fn shlOverflow() noreturn {
        panicHandler("left shift overflowed bits", null);
    }
    pub fn shrOverflow() noreturn {
        panicHandler("right shift overflowed bits", null);
    }
    pub fn divideByZero() noreturn {
        panicHandler("division by zero", null);
    }
    pub fn exactDivisionRemainder() noreturn {
        panicHandler("exact division produced remainder", null);
    }
    pub fn integerPartOutOfBounds() noreturn {
        panicHandler("integer part of floating point value out of bounds", null);
    }
    pub fn corruptSwitch() noreturn {
        panicHandler("switch on corrupt value", null);
    }
    pub fn shiftRhsTooBig() noreturn {
        panicHandler("shift amount is greater than the type size", null);
    }
    pub fn invalidEnumValue() noreturn {
        panicHandler("invalid enum value", null);
    }
    pub fn forLenMismatch() noreturn {
        panicHandler("for loop over objects with non-equal lengths", null);
    }
    pub fn memcpyLenMismatch() noreturn {
        panicHandler("@memcpy arguments have non-equal lengths", null);
    }
    pub fn memcpyAlias() noreturn {
        panicHandler("@memcpy arguments alias", null);
    }
    pub fn noreturnReturned() noreturn {
        panicHandler("'noreturn' function returned", null);
    }
};

// ---------------------------------------------------------------------------------------------
// Contexts and exported callbacks

const Root = root.Root;
const Stream = root.Stream;

const RootEntry = struct { id: u32, ctx: *Root };
const StreamEntry = struct { id: u32, ctx: *Stream };
var roots: std.ArrayListUnmanaged(RootEntry) = .empty;
var streams: std.AutoHashMapUnmanaged(u32, *Stream) = .empty;

fn findRoot(id: u32) ?*Root {
    for (roots.items) |r| if (r.id == id) return r.ctx;
    return null;
}

fn findStream(id: u32) ?*Stream {
    return streams.get(id);
}

export fn proxy_on_context_create(id: u32, parent: u32) void {
    enter();
    defer leave();
    current_context = id;
    if (parent == 0) {
        const r = allocator.create(Root) catch @panic("out of memory");
        r.* = .{};
        if (@hasDecl(Root, "init")) r.init(id);
        roots.append(allocator, .{ .id = id, .ctx = r }) catch @panic("out of memory");
        return;
    }
    const r = findRoot(parent) orelse return;
    const s = allocator.create(Stream) catch @panic("out of memory");
    s.* = .{};
    if (@hasDecl(Stream, "init")) s.init(r, id);
    streams.put(allocator, id, s) catch @panic("out of memory");
}

export fn proxy_on_configure(id: u32, size: u32) u32 {
    enter();
    defer leave();
    current_context = id;
    const r = findRoot(id) orelse return 0;
    if (!@hasDecl(Root, "configure")) return 1;
    const config = if (size == 0) &[_]u8{} else pluginConfiguration();
    return @intFromBool(r.configure(config));
}

fn onTick(id: u32) callconv(.c) void {
    enter();
    defer leave();
    current_context = id;
    if (findRoot(id)) |r| r.onTick();
}

/// The stream that is waiting for `token` (forgotten from `list`), if any.
fn takePending(list: *std.ArrayListUnmanaged(Pending), token: u32) ?u32 {
    for (list.items, 0..) |p, i| {
        if (p.token == token) {
            _ = list.swapRemove(i);
            return p.stream;
        }
    }
    return null;
}

/// Forgets every call a deleted stream was waiting for: a late answer is dropped.
fn forgetStream(list: *std.ArrayListUnmanaged(Pending), stream: u32) void {
    var i: usize = 0;
    while (i < list.items.len) {
        if (list.items[i].stream == stream) _ = list.swapRemove(i) else i += 1;
    }
}

fn onHttpCallResponse(id: u32, token: u32, nh: u32, bs: u32, nt: u32) callconv(.c) void {
    enter();
    defer leave();
    current_context = id;
    const sid = takePending(&pending, token) orelse return;
    const s = findStream(sid) orelse return;
    if (setEffectiveContext(sid) != .ok) return;
    current_context = sid;
    s.onHttpCallResponse(token, nh, bs, nt);
}

fn onRedisCallResponse(id: u32, token: u32, status: i32, size: i32) callconv(.c) void {
    enter();
    defer leave();
    current_context = id;
    const sid = takePending(&redis_pending, token) orelse return;
    const s = findStream(sid) orelse return;
    const reply: []const u8 = if (status == 0 and size > 0) getBufferBytes(.redis_call_response, 0, @intCast(size)) orelse "" else "";
    if (setEffectiveContext(sid) != .ok) return;
    current_context = sid;
    s.onRedisCallResponse(token, status, reply);
}

fn onRequestHeaders(id: u32, n: u32, eos: u32) callconv(.c) u32 {
    enter();
    defer leave();
    current_context = id;
    const s = findStream(id) orelse return 0;
    if (!@hasDecl(Stream, "onRequestHeaders")) return 0;
    return @intFromEnum(s.onRequestHeaders(n, eos != 0));
}

fn onResponseHeaders(id: u32, n: u32, eos: u32) callconv(.c) u32 {
    enter();
    defer leave();
    current_context = id;
    const s = findStream(id) orelse return 0;
    return @intFromEnum(s.onResponseHeaders(n, eos != 0));
}

fn onLog(id: u32) callconv(.c) void {
    enter();
    defer leave();
    current_context = id;
    if (findStream(id)) |s| s.onLog();
}

export fn proxy_on_delete(id: u32) void {
    enter();
    defer leave();
    if (streams.fetchRemove(id)) |kv| {
        if (@hasDecl(Stream, "deinit")) kv.value.deinit();
        allocator.destroy(kv.value);
        forgetStream(&pending, id);
        if (@hasDecl(Stream, "onRedisCallResponse")) forgetStream(&redis_pending, id);
        return;
    }
    for (roots.items, 0..) |r, i| {
        if (r.id == id) {
            if (@hasDecl(Root, "deinit")) r.ctx.deinit();
            allocator.destroy(r.ctx);
            _ = roots.swapRemove(i);
            return;
        }
    }
}

// proxy_on_vm_start and proxy_on_done are not exported: a host treats a missing one as "started"
// and "done" (Envoy, proxy-wasm-cpp-host, sluice), and a missing proxy_on_done saves one call into
// wasm per request. Stream callbacks are exported only when the filter implements them.
comptime {
    if (@hasDecl(Root, "onTick")) @export(&onTick, .{ .name = "proxy_on_tick" });
    if (@hasDecl(Stream, "onHttpCallResponse")) @export(&onHttpCallResponse, .{ .name = "proxy_on_http_call_response" });
    if (@hasDecl(Stream, "onRedisCallResponse")) @export(&onRedisCallResponse, .{ .name = "proxy_on_redis_call_response" });
    // Exported whenever a header callback exists: some hosts read the ABI's header-callback arity
    // (2 or 3 parameters) from proxy_on_request_headers alone.
    if (@hasDecl(Stream, "onRequestHeaders") or @hasDecl(Stream, "onResponseHeaders"))
        @export(&onRequestHeaders, .{ .name = "proxy_on_request_headers" });
    if (@hasDecl(Stream, "onResponseHeaders")) @export(&onResponseHeaders, .{ .name = "proxy_on_response_headers" });
    if (@hasDecl(Stream, "onLog")) @export(&onLog, .{ .name = "proxy_on_log" });
}

// ---------------------------------------------------------------------------------------------
// Small helpers shared by filters

/// Case-insensitive ASCII lower-casing into the given allocator.
pub fn lower(alloc: std.mem.Allocator, s: []const u8) ![]u8 {
    const out = try alloc.alloc(u8, s.len);
    for (s, 0..) |c, i| out[i] = std.ascii.toLower(c);
    return out;
}

/// Path part of a `:path` value (without query string and fragment).
pub fn pathOnly(p: []const u8) []const u8 {
    const end = std.mem.indexOfAny(u8, p, "?#") orelse p.len;
    return p[0..end];
}

// ---------------------------------------------------------------------------------------------
// JSON configuration reading with precise error messages (std.json does the parsing).

pub const ConfigError = error{InvalidConfig};

/// Concatenates `parts` into the scratch arena (a non-generic stand-in for formatting).
pub fn concat(parts: []const []const u8) []const u8 {
    return std.mem.concat(scratch(), u8, parts) catch "";
}

/// Decimal text of `n` in the scratch arena.
pub fn itoa(n: u64) []const u8 {
    var buf: [20]u8 = undefined;
    var i: usize = buf.len;
    var v = n;
    while (true) {
        i -= 1;
        buf[i] = '0' + @as(u8, @intCast(v % 10));
        v /= 10;
        if (v == 0) break;
    }
    return scratch().dupe(u8, buf[i..]) catch "";
}

/// Logs the concatenation of `parts`.
pub fn logParts(level: LogLevel, parts: []const []const u8) void {
    logRaw(level, concat(parts));
}

/// Parses JSON into a `std.json.Value` tree in `alloc` with std.json's scanner. Numbers stay
/// `.number_string` (no float code is linked in); read them with `jsonInt` / `jsonFixed`.
/// Duplicate object keys and nesting deeper than 32 are errors.
pub fn parseJson(alloc: std.mem.Allocator, bytes: []const u8) !std.json.Value {
    var scanner = std.json.Scanner.initCompleteInput(alloc, bytes);
    const v = try jsonValue(alloc, &scanner, try scanner.nextAlloc(alloc, .alloc_always), 0);
    if (try scanner.next() != .end_of_document) return error.SyntaxError;
    return v;
}

fn jsonValue(alloc: std.mem.Allocator, scanner: *std.json.Scanner, token: std.json.Token, level: u32) anyerror!std.json.Value {
    if (level > 32) return error.NestingTooDeep;
    switch (token) {
        .null => return .null,
        .true => return .{ .bool = true },
        .false => return .{ .bool = false },
        .allocated_number => |n| return .{ .number_string = n },
        .number => |n| return .{ .number_string = try alloc.dupe(u8, n) },
        .allocated_string => |t| return .{ .string = t },
        .string => |t| return .{ .string = try alloc.dupe(u8, t) },
        .array_begin => {
            var arr = std.json.Array.init(alloc);
            while (true) {
                const t = try scanner.nextAlloc(alloc, .alloc_always);
                if (t == .array_end) break;
                try arr.append(try jsonValue(alloc, scanner, t, level + 1));
            }
            return .{ .array = arr };
        },
        .object_begin => {
            var obj = std.json.ObjectMap.init(alloc);
            while (true) {
                const t = try scanner.nextAlloc(alloc, .alloc_always);
                const key = switch (t) {
                    .object_end => break,
                    .allocated_string => |k| k,
                    .string => |k| try alloc.dupe(u8, k),
                    else => return error.SyntaxError,
                };
                const val = try jsonValue(alloc, scanner, try scanner.nextAlloc(alloc, .alloc_always), level + 1);
                const gop = try obj.getOrPut(key);
                if (gop.found_existing) return error.DuplicateField;
                gop.value_ptr.* = val;
            }
            return .{ .object = obj };
        },
        else => return error.SyntaxError,
    }
}

/// An integer JSON number; a fraction is truncated toward zero ("12.7" -> 12); exponents rejected.
pub fn jsonInt(v: std.json.Value) ?i64 {
    const text = switch (v) {
        .number_string => |t| t,
        .integer => |i| return i,
        else => return null,
    };
    const int_part = text[0 .. std.mem.indexOfScalar(u8, text, '.') orelse text.len];
    if (std.mem.indexOfAny(u8, text, "eE") != null) return null;
    return std.fmt.parseInt(i64, int_part, 10) catch null;
}

/// A non-negative JSON number as a fixed-point integer with `decimals` fraction digits
/// ("0.25", 3 -> 250). Exponents and negative numbers are rejected; extra digits truncated.
pub fn jsonFixed(v: std.json.Value, decimals: u5) ?u64 {
    const text = switch (v) {
        .number_string => |t| t,
        .integer => |i| if (i >= 0) return std.math.mul(u64, @intCast(i), std.math.powi(u64, 10, decimals) catch return null) catch null else return null,
        else => return null,
    };
    if (text.len == 0 or text[0] == '-' or std.mem.indexOfAny(u8, text, "eE") != null) return null;
    const dot = std.mem.indexOfScalar(u8, text, '.') orelse text.len;
    var out: u64 = std.fmt.parseInt(u64, text[0..dot], 10) catch return null;
    var i: u5 = 0;
    var pos = dot + 1;
    while (i < decimals) : (i += 1) {
        var digit: u64 = 0;
        if (pos < text.len) {
            const c = text[pos];
            if (c < '0' or c > '9') return null;
            digit = c - '0';
            pos += 1;
        }
        out = std.math.mul(u64, out, 10) catch return null;
        out = std.math.add(u64, out, digit) catch return null;
    }
    return out;
}

pub const ConfigReader = struct {
    alloc: std.mem.Allocator,
    message: []const u8 = "",

    /// Records the concatenation of `parts` as the error message.
    pub fn fail(self: *ConfigReader, parts: []const []const u8) ConfigError {
        self.message = std.mem.concat(self.alloc, u8, parts) catch "invalid configuration";
        return error.InvalidConfig;
    }

    /// Logs "<filter>: invalid configuration: <message>" at error level.
    pub fn report(self: *const ConfigReader, filter: []const u8) void {
        logParts(.err, &.{ filter, ": invalid configuration: ", self.message });
    }

    pub fn parse(self: *ConfigReader, bytes: []const u8) ConfigError!std.json.Value {
        if (std.mem.trim(u8, bytes, " \t\r\n").len == 0) return self.fail(&.{"configuration is empty (a JSON object is required)"});
        return parseJson(self.alloc, bytes) catch |e| self.fail(&.{ "not valid JSON (", @errorName(e), ")" });
    }

    /// `v` must be an object whose keys are all in `allowed`.
    pub fn object(self: *ConfigReader, v: std.json.Value, what: []const u8, allowed: []const []const u8) ConfigError!std.json.ObjectMap {
        if (v != .object) return self.fail(&.{ what, " must be a JSON object" });
        var it = v.object.iterator();
        outer: while (it.next()) |e| {
            for (allowed) |a| if (std.mem.eql(u8, a, e.key_ptr.*)) continue :outer;
            if (std.mem.eql(u8, what, "configuration")) return self.fail(&.{ "unknown key \"", e.key_ptr.*, "\"" });
            return self.fail(&.{ "unknown key \"", e.key_ptr.*, "\" in ", what });
        }
        return v.object;
    }

    pub fn string(self: *ConfigReader, v: std.json.Value, what: []const u8) ConfigError![]const u8 {
        if (v != .string) return self.fail(&.{ what, " must be a string" });
        return v.string;
    }

    pub fn nonEmptyString(self: *ConfigReader, v: std.json.Value, what: []const u8) ConfigError![]const u8 {
        const s = try self.string(v, what);
        if (s.len == 0) return self.fail(&.{ what, " must not be empty" });
        return s;
    }

    pub fn boolean(self: *ConfigReader, v: std.json.Value, what: []const u8) ConfigError!bool {
        if (v != .bool) return self.fail(&.{ what, " must be true or false" });
        return v.bool;
    }

    /// A non-negative integer no larger than `max`.
    pub fn uint(self: *ConfigReader, v: std.json.Value, what: []const u8, max: u64) ConfigError!u64 {
        const text = if (v == .number_string) v.number_string else return self.fail(&.{ what, " must be a non-negative integer" });
        const n = std.fmt.parseInt(u64, text, 10) catch return self.fail(&.{ what, " must be a non-negative integer" });
        if (n > max) return self.fail(&.{ what, " must be at most ", itoa(max) });
        return n;
    }

    /// A non-negative number as fixed point with `decimals` fraction digits.
    pub fn fixed(self: *ConfigReader, v: std.json.Value, what: []const u8, decimals: u5) ConfigError!u64 {
        return jsonFixed(v, decimals) orelse self.fail(&.{ what, " must be a non-negative number" });
    }

    pub fn array(self: *ConfigReader, v: std.json.Value, what: []const u8) ConfigError![]std.json.Value {
        if (v != .array) return self.fail(&.{ what, " must be a JSON array" });
        return v.array.items;
    }

    /// An array of strings.
    pub fn strings(self: *ConfigReader, v: std.json.Value, what: []const u8) ConfigError![]const []const u8 {
        const items = try self.array(v, what);
        const out = self.alloc.alloc([]const u8, items.len) catch return self.fail(&.{"out of memory"});
        for (items, 0..) |item, i| {
            if (item != .string) return self.fail(&.{ what, "[", itoa(i), "] must be a string" });
            out[i] = item.string;
        }
        return out;
    }

    pub fn oom(self: *ConfigReader) ConfigError {
        return self.fail(&.{"out of memory"});
    }
};
