// Example sluice filter written with the AssemblyScript proxy-wasm SDK (@solo-io/proxy-runtime).
//
// It adds one response header whose name and value come from the plugin configuration, a JSON
// object such as {"header": "x-greeting", "value": "hello"}. See README.md for the exact rules.

// Re-export the SDK's ABI entry points (proxy_on_* callbacks, malloc, the ABI version marker).
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  log, LogLevelValues,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

const DEFAULT_HEADER = "x-hello";
const DEFAULT_VALUE = "world";

// ---------------------------------------------------------------------------------------------
// A deliberately small JSON reader: it walks one top-level object, keeps the string members
// "header" and "value" and skips every other member (any JSON value, nested ones included).

class JsonReader {
  text: string;
  pos: i32 = 0;
  error: string = "";
  header: string | null = null;
  value: string | null = null;

  constructor(text: string) {
    this.text = text;
  }

  fail(message: string): bool {
    if (this.error.length == 0) {
      this.error = message + " at offset " + this.pos.toString();
    }
    return false;
  }

  skipSpace(): void {
    while (this.pos < this.text.length) {
      const c = this.text.charCodeAt(this.pos);
      if (c != 0x20 && c != 0x09 && c != 0x0a && c != 0x0d) {
        break;
      }
      this.pos++;
    }
  }

  peek(): i32 {
    return this.pos < this.text.length ? this.text.charCodeAt(this.pos) : -1;
  }

  expect(c: i32): bool {
    this.skipSpace();
    if (this.peek() != c) {
      return this.fail("expected '" + String.fromCharCode(c) + "'");
    }
    this.pos++;
    return true;
  }

  // Reads a JSON string starting at the opening quote; null on error.
  readString(): string | null {
    if (this.peek() != 0x22) {
      this.fail("expected a string");
      return null;
    }
    this.pos++;
    let out = "";
    while (true) {
      if (this.pos >= this.text.length) {
        this.fail("unterminated string");
        return null;
      }
      const c = this.text.charCodeAt(this.pos++);
      if (c == 0x22) {
        return out;
      }
      if (c < 0x20) {
        this.fail("control character in string");
        return null;
      }
      if (c != 0x5c) {
        out += String.fromCharCode(c);
        continue;
      }
      if (this.pos >= this.text.length) {
        this.fail("unterminated escape");
        return null;
      }
      const e = this.text.charCodeAt(this.pos++);
      if (e == 0x22) out += "\"";
      else if (e == 0x5c) out += "\\";
      else if (e == 0x2f) out += "/";
      else if (e == 0x62) out += "\b";
      else if (e == 0x66) out += "\f";
      else if (e == 0x6e) out += "\n";
      else if (e == 0x72) out += "\r";
      else if (e == 0x74) out += "\t";
      else if (e == 0x75) {
        let code = 0;
        for (let i = 0; i < 4; i++) {
          const h = this.pos < this.text.length ? this.text.charCodeAt(this.pos++) : -1;
          let d = -1;
          if (h >= 0x30 && h <= 0x39) d = h - 0x30;
          else if (h >= 0x61 && h <= 0x66) d = h - 0x61 + 10;
          else if (h >= 0x41 && h <= 0x46) d = h - 0x41 + 10;
          if (d < 0) {
            this.fail("bad \\u escape");
            return null;
          }
          code = code * 16 + d;
        }
        out += String.fromCharCode(code); // UTF-16 code unit; surrogate pairs combine naturally
      } else {
        this.fail("bad escape");
        return null;
      }
    }
  }

  skipLiteral(word: string): bool {
    if (this.text.substr(this.pos, word.length) != word) {
      return this.fail("unexpected character");
    }
    this.pos += word.length;
    return true;
  }

  skipNumber(): bool {
    const start = this.pos;
    while (this.pos < this.text.length) {
      const c = this.text.charCodeAt(this.pos);
      const ok = (c >= 0x30 && c <= 0x39) || c == 0x2d || c == 0x2b || c == 0x2e || c == 0x65 || c == 0x45;
      if (!ok) {
        break;
      }
      this.pos++;
    }
    return this.pos > start ? true : this.fail("unexpected character");
  }

  // Skips any JSON value (depth-limited).
  skipValue(depth: i32): bool {
    if (depth > 64) {
      return this.fail("nesting too deep");
    }
    this.skipSpace();
    const c = this.peek();
    if (c == 0x22) {
      return this.readString() !== null;
    }
    if (c == 0x7b || c == 0x5b) {
      const close = c == 0x7b ? 0x7d : 0x5d;
      this.pos++;
      this.skipSpace();
      if (this.peek() == close) {
        this.pos++;
        return true;
      }
      while (true) {
        if (c == 0x7b) {
          this.skipSpace();
          if (this.readString() === null || !this.expect(0x3a)) {
            return false;
          }
        }
        if (!this.skipValue(depth + 1)) {
          return false;
        }
        this.skipSpace();
        const n = this.peek();
        if (n == 0x2c) {
          this.pos++;
          continue;
        }
        if (n == close) {
          this.pos++;
          return true;
        }
        return this.fail("expected ',' or a closing bracket");
      }
    }
    if (c == 0x74) return this.skipLiteral("true");
    if (c == 0x66) return this.skipLiteral("false");
    if (c == 0x6e) return this.skipLiteral("null");
    return this.skipNumber();
  }

  // Parses the whole text as one object; records "header" and "value" string members.
  parseConfig(): bool {
    this.skipSpace();
    if (this.peek() != 0x7b) {
      return this.fail("configuration must be a JSON object");
    }
    this.pos++;
    this.skipSpace();
    if (this.peek() == 0x7d) {
      this.pos++;
    } else {
      while (true) {
        this.skipSpace();
        const key = this.readString();
        if (key === null || !this.expect(0x3a)) {
          return false;
        }
        this.skipSpace();
        if (key == "header" || key == "value") {
          const s = this.readString();
          if (s === null) {
            this.error = "";
            return this.fail("\"" + (key as string) + "\" must be a string");
          }
          if (key == "header") this.header = s;
          else this.value = s;
        } else if (!this.skipValue(0)) {
          return false;
        }
        this.skipSpace();
        const n = this.peek();
        if (n == 0x2c) {
          this.pos++;
          continue;
        }
        if (n == 0x7d) {
          this.pos++;
          break;
        }
        return this.fail("expected ',' or '}'");
      }
    }
    this.skipSpace();
    if (this.pos != this.text.length) {
      return this.fail("trailing characters after the object");
    }
    return true;
  }
}

// ---------------------------------------------------------------------------------------------

class AddHeaderRoot extends RootContext {
  headerName: string = DEFAULT_HEADER;
  headerValue: string = DEFAULT_VALUE;

  createContext(context_id: u32): Context {
    return new AddHeader(context_id, this);
  }

  // Called with the size of the plugin configuration. Returning false rejects the plugin.
  onConfigure(configuration_size: u32): bool {
    let name = DEFAULT_HEADER;
    let value = DEFAULT_VALUE;
    if (configuration_size > 0) {
      const raw = get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size);
      const reader = new JsonReader(String.UTF8.decode(raw));
      if (!reader.parseConfig()) {
        log(LogLevelValues.error, "add_header: invalid configuration: " + reader.error);
        return false;
      }
      if (reader.header !== null) name = reader.header as string;
      if (reader.value !== null) value = reader.value as string;
      if (name.length == 0) {
        log(LogLevelValues.error, "add_header: invalid configuration: \"header\" must not be empty");
        return false;
      }
    }
    this.headerName = name;
    this.headerValue = value;
    log(LogLevelValues.info, "add_header: will add response header " + name + ": " + value);
    return true;
  }
}

class AddHeader extends Context {
  constructor(context_id: u32, root_context: AddHeaderRoot) {
    super(context_id, root_context);
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const root = this.root_context as AddHeaderRoot;
    stream_context.headers.response.add(root.headerName, root.headerValue);
    return FilterHeadersStatusValues.Continue;
  }
}

// Root id "" matches sluice's default plugin_root_id.
registerRootContext((context_id: u32): RootContext => { return new AddHeaderRoot(context_id); }, "");
