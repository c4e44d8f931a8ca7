-- Specs for rr.log (engine/log.c): the JSONL event log, with real files in a temporary directory.
-- Run with the engine as the interpreter: rrengine /usr/bin/busted spec/log_spec.lua
local log = require("rr.log")
local fs = require("rr.fs")
local rr = require("rr")
local cjson = require("cjson")
local helpers = require("spec.support.helpers")

local TS_PATTERN = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$"

local mode, ENGINE = helpers.mode, helpers.engine
local proc = require("rr.proc")

-- The lines of a file, without their newlines; the last line must be complete.
local function lines(path)
  local data = assert(fs.read(path))
  assert.equal("\n", data:sub(-1), "the file does not end with a newline")
  local out = {}
  for line in data:gmatch("([^\n]*)\n") do out[#out + 1] = line end
  return out
end

-- The process umask, from /proc/self/status.
local function umask()
  return tonumber(assert(fs.read("/proc/self/status")):match("Umask:%s*(%d+)"), 8) or mode("022")
end

describe("rr.log", function()
  local dir

  before_each(function()
    dir = assert(fs.mkdtemp("/tmp/rr-log-spec-"))
  end)

  after_each(function()
    if dir then assert(fs.remove_tree(dir)) end
    dir = nil
  end)

  describe("timestamp", function()
    it("is RFC 3339 UTC with milliseconds, now", function()
      local ts = log.timestamp()
      assert.matches(TS_PATTERN, ts)
      local y, mo, d, h, mi, s = ts:match("^(%d+)%-(%d+)%-(%d+)T(%d+):(%d+):(%d+)")
      local now = os.date("!*t")
      local t1 = os.time({ year = y, month = mo, day = d, hour = h, min = mi, sec = s })
      local t2 = os.time({ year = now.year, month = now.month, day = now.day, hour = now.hour,
                           min = now.min, sec = now.sec })
      assert.is_true(math.abs(t1 - t2) <= 2)
    end)
  end)

  describe("open", function()
    it("creates the parent directories (0750) and the file (0640)", function()
      local path = dir .. "/var/log/rrengine/events.jsonl"
      local f = assert(log.open(path))
      assert.equal(path, f:path())
      assert.equal(mode("640") & ~umask(), fs.stat(path).mode)
      assert.equal(mode("750") & ~umask(), fs.stat(dir .. "/var/log/rrengine").mode)
      assert.equal(mode("750") & ~umask(), fs.stat(dir .. "/var").mode)
      assert.equal("", fs.read(path))
      f:close()
    end)

    it("takes a mode", function()
      local f = assert(log.open(dir .. "/e.jsonl", { mode = "0600" }))
      f:close()
      assert.equal(mode("600"), fs.stat(dir .. "/e.jsonl").mode)
    end)

    it("refuses a symlink (O_NOFOLLOW) and leaves its target alone", function()
      local target = dir .. "/target"
      assert(fs.write_atomic(target, "precious\n"))
      assert(fs.symlink(target, dir .. "/events.jsonl"))
      local f, err, code = log.open(dir .. "/events.jsonl")
      assert.is_nil(f)
      assert.matches("symbolic link", err)
      assert.equal("ELOOP", code)
      assert.equal("precious\n", fs.read(target))
    end)

    it("refuses what is not a regular file", function()
      local f, err, code = log.open(dir)
      assert.is_nil(f)
      assert.is_string(err)
      assert.is_string(code)
    end)

    it("fails with a code when the directory cannot be made", function()
      assert(fs.write_atomic(dir .. "/file", "x"))
      local f, err, code = log.open(dir .. "/file/sub/events.jsonl")
      assert.is_nil(f)
      assert.matches("file/sub", err)
      assert.equal("ENOTDIR", code)
    end)

    it("raises on misuse", function()
      assert.has_error(function() log.open() end)
      assert.has_error(function() log.open(dir .. "/x", "0640") end)
      assert.has_error(function() log.open(dir .. "/x", { mode = "rw" }) end)
    end)
  end)

  describe("emit", function()
    it("appends one valid JSON line with ts, and returns it", function()
      local path = dir .. "/events.jsonl"
      local f = assert(log.open(path))
      local ok, line = f:emit({ event = "SERVICE_RESTART_START", run = "r1", service = "sso.api",
                                unit = "lilith-sso-api.service", attempt = 1 })
      assert.is_true(ok)
      f:close()
      local got = lines(path)
      assert.equal(1, #got)
      assert.equal(line, got[1])
      local ev = cjson.decode(got[1])
      assert.matches(TS_PATTERN, ev.ts)
      assert.equal("SERVICE_RESTART_START", ev.event)
      assert.equal("r1", ev.run)
      assert.equal("sso.api", ev.service)
      assert.equal("lilith-sso-api.service", ev.unit)
      assert.equal(1, ev.attempt)
    end)

    it("puts ts, event, run, service, unit first, then the other keys sorted", function()
      local f = assert(log.open(dir .. "/e.jsonl"))
      local _, line = f:emit({ zeta = 1, unit = "u", alpha = 2, service = "s", run = "r", event = "E", ts = "T" })
      assert.equal('{"ts":"T","event":"E","run":"r","service":"s","unit":"u","alpha":2,"zeta":1}', line)
      f:close()
    end)

    it("keeps a given ts and never changes the caller's table", function()
      local f = assert(log.open(dir .. "/e.jsonl"))
      local ev = { event = "X" }
      local _, line = f:emit(ev)
      assert.is_nil(ev.ts)
      assert.matches(TS_PATTERN, cjson.decode(line).ts)
      _, line = f:emit({ event = "X", ts = "2026-01-01T00:00:00.000Z" })
      assert.equal("2026-01-01T00:00:00.000Z", cjson.decode(line).ts)
      f:close()
    end)

    it("appends to what is there", function()
      local path = dir .. "/e.jsonl"
      assert(fs.write_atomic(path, '{"old":true}\n'))
      local f = assert(log.open(path))
      assert(f:emit({ event = "NEW" }))
      f:close()
      local got = lines(path)
      assert.equal(2, #got)
      assert.equal('{"old":true}', got[1])
      assert.equal("NEW", cjson.decode(got[2]).event)
    end)

    it("never raises on empty tables, sparse arrays, NaN, infinities, large integers", function()
      local f = assert(log.open(dir .. "/e.jsonl"))
      local ok, line = f:emit({ event = "X", empty = {}, sparse = { [1] = "a", [1000] = "b" },
                                nan = 0 / 0, inf = math.huge, ninf = -math.huge,
                                big = math.maxinteger, nested = { list = { 1, 2, 3 }, deep = { x = {} } } })
      assert.is_true(ok)
      local ev = cjson.decode(line)
      assert.same({}, ev.empty)
      assert.equal("a", ev.sparse["1"])
      assert.equal("b", ev.sparse["1000"])
      assert.equal(cjson.null, ev.nan)
      assert.equal(cjson.null, ev.inf)
      assert.equal(cjson.null, ev.ninf)
      assert.matches('"big":9223372036854775807', line) -- exact, not 9.2233720368548e+18
      assert.same({ 1, 2, 3 }, ev.nested.list)
      f:close()
    end)

    it("escapes strings so that a value with newlines stays on one line", function()
      local path = dir .. "/e.jsonl"
      local f = assert(log.open(path))
      local text = 'line 1\nline 2\r\n"quoted"\0\ttab \\ end'
      assert(f:emit({ event = "X", error = text }))
      f:close()
      local got = lines(path)
      assert.equal(1, #got)
      assert.equal(text, cjson.decode(got[1]).error)
    end)

    it("writes functions and userdata as their tostring, numeric keys as strings", function()
      local f = assert(log.open(dir .. "/e.jsonl"))
      local _, line = f:emit({ event = "X", fn = print, file = f, [1] = "one" })
      local ev = cjson.decode(line)
      assert.matches("^function", ev.fn)
      assert.matches("^rr%.log%.file", ev.file)
      assert.equal("one", ev["1"])
      f:close()
    end)

    it("returns nil, err, EINVAL for what cannot be encoded, and writes nothing", function()
      local path = dir .. "/e.jsonl"
      local f = assert(log.open(path))
      local cycle = {}
      cycle.self = cycle
      local ok, err, code = f:emit({ event = "X", cycle = cycle })
      assert.is_nil(ok)
      assert.matches("cycle", err)
      assert.equal("EINVAL", code)
      ok, err, code = f:emit({ [true] = 1 })
      assert.is_nil(ok)
      assert.matches("keys must be strings", err)
      assert.equal("EINVAL", code)
      f:close()
      assert.equal("", fs.read(path))
    end)

    it("mirrors to the journal when asked, and a missing journal never fails emit", function()
      local f = assert(log.open(dir .. "/e.jsonl", { journal = true }))
      for i = 1, 3 do
        assert.is_true((f:emit({ event = "ROLLBACK_FAILED", run = "r", service = "s", unit = "u.service",
                                 error = "unit failed", attempt = i, ok = false, list = { 1 } })))
      end
      assert.is_true((f:emit({ event = "PLAN_END" })))
      f:close()
      assert.equal(4, #lines(dir .. "/e.jsonl"))
    end)

    it("raises on misuse: not a table, a closed file", function()
      local f = assert(log.open(dir .. "/e.jsonl"))
      assert.has_error(function() f:emit("text") end)
      f:close()
      assert.has_error(function() f:emit({}) end, "attempt to use a closed log file")
      assert.has_error(function() f:sync() end)
    end)
  end)

  describe("sync and close", function()
    it("sync, then close is idempotent, and <close> closes", function()
      local f = assert(log.open(dir .. "/e.jsonl"))
      assert(f:emit({ event = "X" }))
      assert.is_true(f:sync())
      assert.is_true(f:close())
      assert.is_true(f:close())
      assert.matches("closed", tostring(f))
      local g
      do
        local h <close> = assert(log.open(dir .. "/e.jsonl"))
        g = h
        assert.matches("open", tostring(h))
      end
      assert.matches("closed", tostring(g))
    end)
  end)

  describe("concurrent writers", function()
    it("two processes appending 2000 lines each leave 4000 whole JSON lines", function()
      local path = dir .. "/events.jsonl"
      -- Lines longer than PIPE_BUF (4096): O_APPEND + one write() keeps them whole anyway.
      local writer = [[
        local f = assert(require("rr.log").open(%q))
        local pad = string.rep("x", 5000)
        for i = 1, 2000 do assert(f:emit({ event = "W", writer = %d, i = i, pad = pad })) end
        assert(f:close())
        io.write("ok")
      ]]
      local function run(n)
        return proc.run({ ENGINE, "-e", string.format(writer, path, n) }, { timeout = 120 })
      end
      local results = rr.wait({ rr.spawn(run, 1), rr.spawn(run, 2) })
      for n, r in ipairs(results) do
        assert.is_true(r[1], tostring(r[2]))
        assert(r[2], "writer " .. n .. ": " .. tostring(r[3]))
        assert.equal("ok", r[2].stdout)
      end

      local got = lines(path)
      assert.equal(4000, #got)
      local next_i = { 0, 0 }
      for k, line in ipairs(got) do
        local ok, ev = pcall(cjson.decode, line)
        assert(ok, "line " .. k .. " is not valid JSON: " .. line:sub(1, 120))
        assert.equal("W", ev.event)
        assert.equal(5000, #ev.pad)
        -- every writer's lines arrive whole and in its own order
        assert.equal(next_i[ev.writer] + 1, ev.i)
        next_i[ev.writer] = ev.i
      end
      assert.same({ 2000, 2000 }, next_i)
    end)
  end)
end)
