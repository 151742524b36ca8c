//! Example filter: adds one response header whose name and value come from the configuration.
//!
//! Configuration: {"name": "x-hello", "value": "world"}
const std = @import("std");
const pw = @import("proxy_wasm");

pub const panic = pw.panic;
comptime {
    _ = pw; // analyse the binding: its exports become the module's exports
}

pub const Root = struct {
    name: []const u8 = "",
    value: []const u8 = "",

    pub fn configure(self: *Root, config: []const u8) bool {
        var arena = std.heap.ArenaAllocator.init(pw.allocator);
        var reader = pw.ConfigReader{ .alloc = arena.allocator() };
        self.load(&reader, config) catch {
            reader.report("add_header");
            arena.deinit();
            return false;
        };
        return true; // the arena stays alive with the plugin
    }

    fn load(self: *Root, reader: *pw.ConfigReader, config: []const u8) !void {
        const obj = try reader.object(try reader.parse(config), "configuration", &.{ "name", "value" });
        const name = obj.get("name") orelse return reader.fail(&.{"\"name\" is required"});
        self.name = try pw.lower(reader.alloc, try reader.nonEmptyString(name, "name"));
        if (obj.get("value")) |v| self.value = try reader.string(v, "value");
    }
};

pub const Stream = struct {
    root: *Root = undefined,

    pub fn init(self: *Stream, root: *Root, _: u32) void {
        self.root = root;
    }

    pub fn onResponseHeaders(self: *Stream, _: u32, _: bool) pw.Action {
        pw.replaceHeader(.response_headers, self.root.name, self.root.value);
        return .@"continue";
    }
};
