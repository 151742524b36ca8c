//! auth.wasm: client certificates, API keys, HS256 JWTs and an optional external authorization callout.
//!
//! Order per request: exempt path prefix -> allow untouched (client-supplied subject header removed);
//! otherwise a verified client certificate (when `client_certs` is configured and the connection is
//! mTLS) whose subject or URI SAN is listed, else the API key header (when API keys are configured
//! and the header is present), else a bearer JWT (when `jwt` is configured). No/invalid credential -> 401 with
//! `WWW-Authenticate: Bearer realm="sluice"`; subject not in `allowed_subjects` -> 403; then the
//! `ext_authz` callout when configured (2xx allows, another status is replied as is, a failed call 503).
const std = @import("std");
const pw = @import("proxy_wasm");

pub const panic = pw.panic;
comptime {
    _ = pw;
}

const Sha256 = std.crypto.hash.sha2.Sha256;
const HmacSha256 = std.crypto.auth.hmac.sha2.HmacSha256;
const b64 = std.base64.url_safe_no_pad;

const ApiKey = struct { digest: [32]u8, subject: []const u8 };

/// A client certificate the listener verified, recognised by its subject (RFC 4514, as the
/// `connection.subject_peer_certificate` property gives it) or its first URI SAN.
const ClientCert = struct { by_uri_san: bool, value: []const u8, subject: []const u8 };

const Jwt = struct {
    secret: []const u8,
    hs256: bool,
    issuer: ?[]const u8 = null,
    audience: ?[]const u8 = null,
    leeway_s: i64 = 30,
};

const ExtAuthz = struct {
    cluster: []const u8,
    path: []const u8 = "/check",
    headers: []const []const u8,
    timeout_ms: u32 = 500,
};

const Config = struct {
    client_certs: []const ClientCert = &.{},
    api_keys: []const ApiKey = &.{},
    api_key_header: []const u8 = "x-api-key",
    jwt: ?Jwt = null,
    ext_authz: ?ExtAuthz = null,
    allowed_subjects: ?[]const []const u8 = null,
    subject_header: []const u8 = "x-auth-subject",
    strip_credentials: bool = false,
    exempt_paths: []const []const u8 = &.{},
};

pub const Root = struct {
    arena: std.heap.ArenaAllocator = std.heap.ArenaAllocator.init(pw.allocator),
    config: Config = .{},
    allowed: u32 = 0,
    denied: u32 = 0,

    pub fn init(self: *Root, _: u32) void {
        self.allowed = pw.defineMetric(.counter, "auth_allowed");
        self.denied = pw.defineMetric(.counter, "auth_denied");
    }

    pub fn deinit(self: *Root) void {
        self.arena.deinit();
    }

    pub fn configure(self: *Root, bytes: []const u8) bool {
        _ = self.arena.reset(.free_all);
        var reader = pw.ConfigReader{ .alloc = self.arena.allocator() };
        self.config = parseConfig(&reader, bytes) catch {
            reader.report("auth");
            return false;
        };
        return true;
    }
};

fn subjectFor(r: *pw.ConfigReader, digest: [32]u8) ![]const u8 {
    const hex = std.fmt.bytesToHex(digest, .lower);
    return std.mem.concat(r.alloc, u8, &.{ "key-", hex[0..8] }) catch r.oom();
}

fn parseDigest(r: *pw.ConfigReader, hex: []const u8, what: []const u8) ![32]u8 {
    var out: [32]u8 = undefined;
    if (hex.len != 64) return r.fail(&.{ what, ": sha256 must be 64 hex digits" });
    _ = std.fmt.hexToBytes(&out, hex) catch return r.fail(&.{ what, ": sha256 must be 64 hex digits" });
    return out;
}

fn lowerName(r: *pw.ConfigReader, v: std.json.Value, what: []const u8) ![]const u8 {
    return pw.lower(r.alloc, try r.nonEmptyString(v, what)) catch r.oom();
}

fn parseConfig(r: *pw.ConfigReader, bytes: []const u8) !Config {
    const a = r.alloc;
    const obj = try r.object(try r.parse(bytes), "configuration", &.{
        "api_keys",         "api_key_header", "jwt",               "ext_authz",
        "allowed_subjects", "subject_header", "strip_credentials", "exempt_paths",
        "client_certs",
    });
    var c = Config{};
    if (obj.get("client_certs")) |v| {
        const items = try r.array(v, "client_certs");
        const certs = a.alloc(ClientCert, items.len) catch return r.oom();
        for (items, 0..) |item, i| {
            const what = std.mem.concat(a, u8, &.{ "client_certs[", pw.itoa(i), "]" }) catch return r.oom();
            const o = try r.object(item, what, &.{ "subject", "uri_san", "as" });
            const subject = o.get("subject");
            const uri = o.get("uri_san");
            if ((subject == null) == (uri == null)) return r.fail(&.{ what, " needs exactly one of \"subject\" and \"uri_san\"" });
            certs[i].by_uri_san = uri != null;
            certs[i].value = try r.nonEmptyString(subject orelse uri.?, what);
            certs[i].subject = if (o.get("as")) |s| try r.nonEmptyString(s, what) else certs[i].value;
        }
        c.client_certs = certs;
    }
    if (obj.get("api_keys")) |v| {
        const items = try r.array(v, "api_keys");
        const keys = a.alloc(ApiKey, items.len) catch return r.oom();
        for (items, 0..) |item, i| {
            const what = std.mem.concat(a, u8, &.{ "api_keys[", pw.itoa(i), "]" }) catch return r.oom();
            switch (item) {
                .string => |s| {
                    if (std.mem.startsWith(u8, s, "sha256:")) {
                        keys[i].digest = try parseDigest(r, s[7..], what);
                    } else {
                        if (s.len == 0) return r.fail(&.{ what, " must not be empty" });
                        Sha256.hash(s, &keys[i].digest, .{});
                    }
                    keys[i].subject = try subjectFor(r, keys[i].digest);
                },
                .object => {
                    const o = try r.object(item, what, &.{ "key", "sha256", "subject" });
                    const key = o.get("key");
                    const sha = o.get("sha256");
                    if ((key == null) == (sha == null)) return r.fail(&.{ what, " needs exactly one of \"key\" and \"sha256\"" });
                    if (key) |k| {
                        Sha256.hash(try r.nonEmptyString(k, what), &keys[i].digest, .{});
                    } else {
                        keys[i].digest = try parseDigest(r, try r.string(sha.?, what), what);
                    }
                    keys[i].subject = if (o.get("subject")) |s| try r.nonEmptyString(s, what) else try subjectFor(r, keys[i].digest);
                },
                else => return r.fail(&.{ what, " must be a string or an object" }),
            }
        }
        c.api_keys = keys;
    }
    if (obj.get("api_key_header")) |v| c.api_key_header = try lowerName(r, v, "api_key_header");
    if (obj.get("subject_header")) |v| c.subject_header = try lowerName(r, v, "subject_header");
    if (obj.get("strip_credentials")) |v| c.strip_credentials = try r.boolean(v, "strip_credentials");
    if (obj.get("exempt_paths")) |v| c.exempt_paths = try r.strings(v, "exempt_paths");
    if (obj.get("allowed_subjects")) |v| c.allowed_subjects = try r.strings(v, "allowed_subjects");
    if (obj.get("jwt")) |v| {
        const o = try r.object(v, "jwt", &.{ "secret", "algorithms", "issuer", "audience", "leeway_s" });
        const secret = o.get("secret") orelse return r.fail(&.{"jwt.secret is required"});
        var j = Jwt{ .secret = try r.nonEmptyString(secret, "jwt.secret"), .hs256 = true };
        if (o.get("algorithms")) |algs| {
            const list = try r.strings(algs, "jwt.algorithms");
            if (list.len == 0) return r.fail(&.{"jwt.algorithms must not be empty"});
            j.hs256 = false;
            for (list) |alg| {
                if (!std.mem.eql(u8, alg, "HS256")) return r.fail(&.{ "jwt.algorithms: unsupported algorithm \"", alg, "\" (only HS256)" });
                j.hs256 = true;
            }
        }
        if (o.get("issuer")) |s| j.issuer = try r.string(s, "jwt.issuer");
        if (o.get("audience")) |s| j.audience = try r.string(s, "jwt.audience");
        if (o.get("leeway_s")) |s| j.leeway_s = @intCast(try r.uint(s, "jwt.leeway_s", 86400));
        c.jwt = j;
    }
    if (obj.get("ext_authz")) |v| {
        const o = try r.object(v, "ext_authz", &.{ "cluster", "path", "headers", "timeout_ms" });
        const cluster = o.get("cluster") orelse return r.fail(&.{"ext_authz.cluster is required"});
        var e = ExtAuthz{ .cluster = try r.nonEmptyString(cluster, "ext_authz.cluster"), .headers = &.{ "authorization", "x-api-key" } };
        if (o.get("path")) |p| {
            e.path = try r.nonEmptyString(p, "ext_authz.path");
            if (e.path[0] != '/') return r.fail(&.{"ext_authz.path must start with /"});
        }
        if (o.get("headers")) |h| {
            const list = try r.strings(h, "ext_authz.headers");
            const low = a.alloc([]const u8, list.len) catch return r.oom();
            for (list, 0..) |name, i| low[i] = pw.lower(a, name) catch return r.oom();
            e.headers = low;
        }
        if (o.get("timeout_ms")) |t| {
            e.timeout_ms = @intCast(try r.uint(t, "ext_authz.timeout_ms", 600_000));
            if (e.timeout_ms == 0) return r.fail(&.{"ext_authz.timeout_ms must be positive"});
        }
        c.ext_authz = e;
    }
    if (c.client_certs.len == 0 and c.api_keys.len == 0 and c.jwt == null and c.ext_authz == null)
        return r.fail(&.{"no authentication method configured (client_certs, api_keys, jwt or ext_authz)"});
    return c;
}

// ---------------------------------------------------------------------------------------------
// Credential checks

const Identity = struct { subject: ?[]const u8 };

fn checkApiKey(c: *const Config, presented: []const u8) ?[]const u8 {
    var digest: [32]u8 = undefined;
    Sha256.hash(presented, &digest, .{});
    var found: ?[]const u8 = null;
    for (c.api_keys) |k| {
        // Compare against every key (no early exit) with a constant-time comparison.
        if (std.crypto.timing_safe.eql([32]u8, digest, k.digest) and found == null) found = k.subject;
    }
    return found;
}

/// The identity of the connection's verified client certificate, null without one. `unknown` is set
/// when a certificate was presented that no `client_certs` entry names.
fn checkClientCert(c: *const Config, unknown: *bool) ?[]const u8 {
    const mtls = pw.getProperty(&.{ "connection", "mtls" }) orelse return null;
    if (mtls.len != 1 or mtls[0] == 0) return null;
    const subject = pw.getProperty(&.{ "connection", "subject_peer_certificate" }) orelse "";
    const uri = pw.getProperty(&.{ "connection", "uri_san_peer_certificate" }) orelse "";
    for (c.client_certs) |cert| {
        const presented = if (cert.by_uri_san) uri else subject;
        if (presented.len > 0 and std.mem.eql(u8, presented, cert.value)) return cert.subject;
    }
    unknown.* = true;
    return null;
}

fn decodeB64(part: []const u8) ?[]u8 {
    const trimmed = std.mem.trimRight(u8, part, "=");
    const n = b64.Decoder.calcSizeForSlice(trimmed) catch return null;
    const out = pw.scratch().alloc(u8, n) catch return null;
    b64.Decoder.decode(out, trimmed) catch return null;
    return out;
}

fn parseJsonObject(bytes: []const u8) ?std.json.ObjectMap {
    const v = pw.parseJson(pw.scratch(), bytes) catch return null;
    return if (v == .object) v.object else null;
}

fn numericClaim(v: std.json.Value) ?i64 {
    return pw.jsonInt(v);
}

/// Verifies an HS256 JWT; returns the subject (`sub`, may be null) or the reason it is invalid.
fn verifyJwt(j: *const Jwt, token: []const u8, reason: *[]const u8) ?Identity {
    var it = std.mem.splitScalar(u8, token, '.');
    const h64 = it.next() orelse "";
    const p64 = it.next() orelse {
        reason.* = "malformed";
        return null;
    };
    const s64 = it.next() orelse {
        reason.* = "malformed";
        return null;
    };
    if (it.next() != null or h64.len == 0 or p64.len == 0) {
        reason.* = "malformed";
        return null;
    }
    const header = parseJsonObject(decodeB64(h64) orelse {
        reason.* = "malformed header";
        return null;
    }) orelse {
        reason.* = "malformed header";
        return null;
    };
    const alg_v = header.get("alg") orelse {
        reason.* = "missing alg";
        return null;
    };
    if (alg_v != .string) {
        reason.* = "malformed header";
        return null;
    }
    if (std.ascii.eqlIgnoreCase(alg_v.string, "none")) {
        reason.* = "alg none not allowed";
        return null;
    }
    if (!(j.hs256 and std.mem.eql(u8, alg_v.string, "HS256"))) {
        reason.* = "algorithm not allowed";
        return null;
    }
    const sig = decodeB64(s64) orelse {
        reason.* = "bad signature";
        return null;
    };
    var expected: [HmacSha256.mac_length]u8 = undefined;
    HmacSha256.create(&expected, token[0 .. h64.len + 1 + p64.len], j.secret);
    if (sig.len != expected.len or !std.crypto.timing_safe.eql([32]u8, sig[0..32].*, expected)) {
        reason.* = "bad signature";
        return null;
    }
    const claims = parseJsonObject(decodeB64(p64) orelse {
        reason.* = "malformed payload";
        return null;
    }) orelse {
        reason.* = "malformed payload";
        return null;
    };
    const now_s: i64 = @intCast(pw.now() / std.time.ns_per_s);
    if (claims.get("exp")) |v| {
        const exp = numericClaim(v) orelse {
            reason.* = "malformed exp";
            return null;
        };
        if (now_s >= exp +| j.leeway_s) { // RFC 7519: expired on or after exp
            reason.* = "expired";
            return null;
        }
    }
    if (claims.get("nbf")) |v| {
        const nbf = numericClaim(v) orelse {
            reason.* = "malformed nbf";
            return null;
        };
        if (now_s +| j.leeway_s < nbf) {
            reason.* = "not yet valid";
            return null;
        }
    }
    if (j.issuer) |want| {
        const iss = claims.get("iss");
        if (iss == null or iss.? != .string or !std.mem.eql(u8, iss.?.string, want)) {
            reason.* = "bad issuer";
            return null;
        }
    }
    if (j.audience) |want| {
        var ok = false;
        if (claims.get("aud")) |aud| switch (aud) {
            .string => |s| ok = std.mem.eql(u8, s, want),
            .array => |arr| for (arr.items) |item| {
                if (item == .string and std.mem.eql(u8, item.string, want)) ok = true;
            },
            else => {},
        };
        if (!ok) {
            reason.* = "bad audience";
            return null;
        }
    }
    var subject: ?[]const u8 = null;
    if (claims.get("sub")) |v| {
        if (v != .string) {
            reason.* = "malformed sub";
            return null;
        }
        subject = v.string;
    }
    return .{ .subject = subject };
}

/// A path an upstream might normalise to something else ("/healthz/../admin", "/healthz%2f..",
/// "/healthz\\..") never matches an exempt prefix: such requests are authenticated as usual.
fn ambiguousPath(path: []const u8) bool {
    var it = std.mem.splitScalar(u8, path, '/');
    while (it.next()) |seg| {
        if (std.mem.eql(u8, seg, ".") or std.mem.eql(u8, seg, "..")) return true;
    }
    if (std.mem.indexOfScalar(u8, path, '\\') != null) return true;
    var i: usize = 0;
    while (std.mem.indexOfScalarPos(u8, path, i, '%')) |pct| : (i = pct + 1) {
        if (pct + 2 >= path.len) return true;
        const code = std.fmt.parseInt(u8, path[pct + 1 .. pct + 3], 16) catch return true;
        if (code == '.' or code == '/' or code == '\\' or code == '%') return true;
    }
    return false;
}

// ---------------------------------------------------------------------------------------------
// Stream

const www_authenticate = [_]pw.Pair{.{ "www-authenticate", "Bearer realm=\"sluice\"" }};

pub const Stream = struct {
    root: *Root = undefined,
    /// The identity's subject, owned by this stream (it must outlive a pending callout).
    subject: ?[]const u8 = null,
    waiting: bool = false,

    pub fn init(self: *Stream, root: *Root, _: u32) void {
        self.root = root;
    }

    pub fn deinit(self: *Stream) void {
        if (self.subject) |s| pw.allocator.free(s);
    }

    fn deny(self: *Stream, status: u32, body: []const u8, details: []const u8) pw.Action {
        pw.incrementMetric(self.root.denied, 1);
        const headers: []const pw.Pair = if (status == 401) &www_authenticate else &.{};
        pw.sendLocalResponse(status, details, body, headers);
        return .pause;
    }

    fn denyMissing(self: *Stream, unknown_cert: bool) pw.Action {
        if (unknown_cert) return self.deny(401, "unknown client certificate", "auth_unknown_client_certificate");
        return self.deny(401, "missing credentials", "auth_missing_credentials");
    }

    fn allow(self: *Stream) void {
        const c = &self.root.config;
        pw.removeHeader(.request_headers, c.subject_header);
        if (self.subject) |s| pw.replaceHeader(.request_headers, c.subject_header, s);
        if (c.strip_credentials) {
            pw.removeHeader(.request_headers, c.api_key_header);
            pw.removeHeader(.request_headers, "authorization");
        }
        pw.incrementMetric(self.root.allowed, 1);
    }

    fn setSubject(self: *Stream, s: ?[]const u8) void {
        if (self.subject) |old| pw.allocator.free(old);
        self.subject = null;
        if (s) |v| self.subject = pw.allocator.dupe(u8, v) catch @panic("out of memory");
    }

    pub fn onRequestHeaders(self: *Stream, _: u32, _: bool) pw.Action {
        const c = &self.root.config;
        const path = pw.pathOnly(pw.getHeader(.request_headers, ":path") orelse "/");
        const exemptable = !ambiguousPath(path);
        for (c.exempt_paths) |prefix| {
            if (exemptable and std.mem.startsWith(u8, path, prefix)) {
                pw.removeHeader(.request_headers, c.subject_header);
                return .@"continue";
            }
        }

        const local = c.client_certs.len > 0 or c.api_keys.len > 0 or c.jwt != null;
        var identified = false;
        var unknown_cert = false;
        const cert_subject = if (c.client_certs.len > 0) checkClientCert(c, &unknown_cert) else null;
        if (cert_subject) |subject| {
            self.setSubject(subject);
            identified = true;
        } else if (local) {
            const api_key = if (c.api_keys.len > 0) pw.getHeader(.request_headers, c.api_key_header) else null;
            if (api_key) |key| {
                const subject = checkApiKey(c, key) orelse return self.deny(401, "invalid api key", "auth_invalid_api_key");
                self.setSubject(subject);
                identified = true;
            } else if (c.jwt) |*j| {
                const authz = pw.getHeader(.request_headers, "authorization") orelse
                    return self.denyMissing(unknown_cert);
                const prefix = "bearer ";
                if (authz.len <= prefix.len or !std.ascii.eqlIgnoreCase(authz[0..prefix.len], prefix))
                    return self.deny(401, "missing credentials", "auth_missing_credentials");
                const token = std.mem.trim(u8, authz[prefix.len..], " ");
                var reason: []const u8 = "";
                const id = verifyJwt(j, token, &reason) orelse {
                    return self.deny(401, pw.concat(&.{ "invalid token: ", reason }), "auth_invalid_token");
                };
                self.setSubject(id.subject);
                identified = true;
            } else {
                return self.denyMissing(unknown_cert);
            }
        }
        if (identified) {
            if (c.allowed_subjects) |allowed| {
                const s = self.subject orelse return self.deny(403, "forbidden", "auth_forbidden");
                for (allowed) |a| {
                    if (std.mem.eql(u8, a, s)) break;
                } else return self.deny(403, "forbidden", "auth_forbidden");
            }
        }
        if (c.ext_authz) |*e| return self.callExtAuthz(e);
        self.allow();
        return .@"continue";
    }

    fn callExtAuthz(self: *Stream, e: *const ExtAuthz) pw.Action {
        var headers = std.ArrayList(pw.Pair).init(pw.scratch());
        headers.appendSlice(&.{ .{ ":method", "GET" }, .{ ":path", e.path }, .{ ":authority", e.cluster } }) catch
            return self.deny(503, "authorization unavailable", "auth_ext_authz_failed");
        for (e.headers) |name| {
            if (pw.getHeader(.request_headers, name)) |v| headers.append(.{ name, v }) catch {};
        }
        _ = pw.httpCall(e.cluster, headers.items, "", &.{}, e.timeout_ms) catch
            return self.deny(503, "authorization unavailable", "auth_ext_authz_failed");
        self.waiting = true;
        return .pause;
    }

    pub fn onHttpCallResponse(self: *Stream, _: u32, num_headers: u32, _: u32, _: u32) void {
        if (!self.waiting) return;
        self.waiting = false;
        if (num_headers == 0) {
            _ = self.deny(503, "authorization unavailable", "auth_ext_authz_failed");
            return;
        }
        const status = pw.httpCallResponseStatus();
        if (status >= 200 and status < 300) {
            self.allow();
            pw.continueStream(.request);
            return;
        }
        if (status < 200 or status > 599) {
            _ = self.deny(503, "authorization unavailable", "auth_ext_authz_failed");
            return;
        }
        _ = self.deny(status, if (status == 401) "unauthorized" else "forbidden", "auth_ext_authz_denied");
    }
};
