//! ab.wasm: A/B routing. Picks a variant per request and writes it into a request header.
//!
//! A client-supplied variant header is kept only when it names a variant in `allow_force`.
//! Otherwise: with `key` configured and present, the variant is a weighted bucket of
//! Wyhash(salt ++ key) (sticky per key); else a `<cookie>=<variant>` cookie naming a variant with a
//! positive weight; else a weighted random pick (WASI random_get), remembered with Set-Cookie.
const std = @import("std");
const pw = @import("proxy_wasm");

pub const panic = pw.panic;
comptime {
    _ = pw;
}

const hash_seed: u64 = 0x736c756963652d61; // "sluice-a", fixed so buckets are stable across builds

const Variant = struct { name: []const u8, weight: u64, metric: u32 = 0, forcible: bool = false };

const KeyKind = enum { none, cookie, header };

pub const Root = struct {
    arena: std.heap.ArenaAllocator = std.heap.ArenaAllocator.init(pw.allocator),
    variants: []Variant = &.{},
    total: u64 = 0,
    header: []const u8 = "x-variant",
    key_kind: KeyKind = .none,
    key_name: []const u8 = "",
    cookie: []const u8 = "sluice_ab",
    salt: []const u8 = "",

    pub fn deinit(self: *Root) void {
        self.arena.deinit();
    }

    pub fn configure(self: *Root, bytes: []const u8) bool {
        _ = self.arena.reset(.free_all);
        self.* = .{ .arena = self.arena };
        var reader = pw.ConfigReader{ .alloc = self.arena.allocator() };
        self.parseConfig(&reader, bytes) catch {
            reader.report("ab");
            return false;
        };
        for (self.variants) |*v| v.metric = pw.defineMetric(.counter, pw.concat(&.{ "ab_variant_", v.name }));
        return true;
    }

    fn parseConfig(self: *Root, r: *pw.ConfigReader, bytes: []const u8) !void {
        const a = r.alloc;
        const obj = try r.object(try r.parse(bytes), "configuration", &.{ "variants", "header", "key", "cookie", "allow_force", "salt" });
        const vv = obj.get("variants") orelse return r.fail(&.{"variants is required"});
        if (vv != .object) return r.fail(&.{"variants must be a JSON object of name -> weight"});
        if (vv.object.count() == 0) return r.fail(&.{"variants must not be empty"});
        const variants = a.alloc(Variant, vv.object.count()) catch return r.oom();
        var it = vv.object.iterator();
        var i: usize = 0;
        var total: u64 = 0;
        while (it.next()) |e| : (i += 1) {
            const name = e.key_ptr.*;
            if (name.len == 0) return r.fail(&.{"variants: a variant name must not be empty"});
            for (name) |c| {
                if (c <= ' ' or c == ';' or c == ',' or c == '=' or c == '"' or c == '\\' or c >= 0x7f)
                    return r.fail(&.{ "variants: name \"", name, "\" may not contain spaces, control characters or ;,=\"\\" });
            }
            const weight = try r.uint(e.value_ptr.*, pw.concat(&.{ "variants.", name }), 1_000_000_000);
            variants[i] = .{ .name = name, .weight = weight };
            total += weight;
        }
        if (total == 0) return r.fail(&.{"variants: the weights must add up to more than 0"});
        self.variants = variants;
        self.total = total;
        if (obj.get("header")) |v| self.header = pw.lower(a, try r.nonEmptyString(v, "header")) catch return r.oom();
        if (obj.get("cookie")) |v| {
            self.cookie = try r.nonEmptyString(v, "cookie");
            for (self.cookie) |c| {
                if (c <= ' ' or c == ';' or c == ',' or c == '=' or c >= 0x7f) return r.fail(&.{"cookie: not a valid cookie name"});
            }
        }
        if (obj.get("salt")) |v| self.salt = try r.string(v, "salt");
        if (obj.get("key")) |v| {
            const key = try r.nonEmptyString(v, "key");
            if (std.mem.startsWith(u8, key, "cookie:") and key.len > 7) {
                self.key_kind = .cookie;
                self.key_name = key[7..];
            } else if (std.mem.startsWith(u8, key, "header:") and key.len > 7) {
                self.key_kind = .header;
                self.key_name = pw.lower(a, key[7..]) catch return r.oom();
            } else if (std.mem.eql(u8, key, "subject")) {
                self.key_kind = .header;
                self.key_name = "x-auth-subject";
            } else if (std.mem.startsWith(u8, key, "subject:") and key.len > 8) {
                self.key_kind = .header;
                self.key_name = pw.lower(a, key[8..]) catch return r.oom();
            } else {
                return r.fail(&.{ "key: unknown key \"", key, "\" (cookie:<name>, header:<name> or subject)" });
            }
        }
        if (obj.get("allow_force")) |v| {
            for (try r.strings(v, "allow_force")) |name| {
                const variant = self.find(name) orelse return r.fail(&.{ "allow_force: \"", name, "\" is not a variant" });
                variant.forcible = true;
            }
        }
    }

    fn find(self: *Root, name: []const u8) ?*Variant {
        for (self.variants) |*v| if (std.mem.eql(u8, v.name, name)) return v;
        return null;
    }

    /// The variant owning point `x` in [0, total).
    fn pick(self: *Root, x: u64) *Variant {
        var acc: u64 = 0;
        for (self.variants) |*v| {
            acc += v.weight;
            if (x < acc) return v;
        }
        return &self.variants[self.variants.len - 1];
    }
};

/// Value of cookie `name` in the request's Cookie headers.
fn cookieValue(name: []const u8) ?[]const u8 {
    for (pw.getHeaders(.request_headers)) |h| {
        if (!std.ascii.eqlIgnoreCase(h[0], "cookie")) continue;
        var parts = std.mem.splitScalar(u8, h[1], ';');
        while (parts.next()) |part| {
            const kv = std.mem.trim(u8, part, " \t");
            const eq = std.mem.indexOfScalar(u8, kv, '=') orelse continue;
            if (std.mem.eql(u8, kv[0..eq], name)) return std.mem.trim(u8, kv[eq + 1 ..], "\"");
        }
    }
    return null;
}

pub const Stream = struct {
    root: *Root = undefined,
    set_cookie: ?*Variant = null,

    pub fn init(self: *Stream, root: *Root, _: u32) void {
        self.root = root;
    }

    pub fn onRequestHeaders(self: *Stream, _: u32, _: bool) pw.Action {
        const root = self.root;
        if (pw.getHeader(.request_headers, root.header)) |forced| {
            if (root.find(forced)) |v| {
                if (v.forcible) {
                    pw.incrementMetric(v.metric, 1);
                    return .@"continue";
                }
            }
            pw.removeHeader(.request_headers, root.header);
        }
        const variant = self.choose();
        pw.replaceHeader(.request_headers, root.header, variant.name);
        pw.incrementMetric(variant.metric, 1);
        return .@"continue";
    }

    fn choose(self: *Stream) *Variant {
        const root = self.root;
        const key: ?[]const u8 = switch (root.key_kind) {
            .none => null,
            .cookie => cookieValue(root.key_name),
            .header => pw.getHeader(.request_headers, root.key_name),
        };
        if (key) |k| {
            if (k.len > 0) {
                var h = std.hash.Wyhash.init(hash_seed);
                h.update(root.salt);
                h.update(k);
                return root.pick(h.final() % root.total);
            }
        }
        if (cookieValue(root.cookie)) |name| {
            if (root.find(name)) |v| {
                if (v.weight > 0) return v;
            }
        }
        const v = root.pick(pw.randomInt() % root.total);
        self.set_cookie = v;
        return v;
    }

    pub fn onResponseHeaders(self: *Stream, _: u32, _: bool) pw.Action {
        const v = self.set_cookie orelse return .@"continue";
        self.set_cookie = null;
        pw.addHeader(.response_headers, "set-cookie", pw.concat(&.{ self.root.cookie, "=", v.name, "; Path=/; Max-Age=2592000; HttpOnly" }));
        return .@"continue";
    }
};
