-- rr.loop: tasks on the one sd-event loop.
local rr = require("rr")

local engine = os.getenv("RR_ENGINE") or arg[-1]

describe("rr.loop tasks", function()
  it("runs 100 tasks sleeping 0.2 s concurrently", function()
    local t0 = rr.now()
    local tasks = {}
    for i = 1, 100 do
      tasks[i] = rr.spawn(function(x) rr.sleep(0.2); return x * 2 end, i)
    end
    local results = rr.wait(tasks)
    local elapsed = rr.now() - t0
    assert.equal(100, #results)
    for i = 1, 100 do
      assert.same({ true, i * 2, n = 2 }, results[i])
    end
    assert.is_true(elapsed >= 0.2, "slept less than asked")
    assert.is_true(elapsed < 1.0, ("100 sleeps took %.3f s: not concurrent"):format(elapsed))
  end)

  it("reports a task's error with its traceback and keeps the others running", function()
    local bad = rr.spawn(function()
      rr.sleep(0.01)
      local t = nil
      return t.field
    end)
    local good = rr.spawn(function() rr.sleep(0.05); return "still here" end)
    local ok, err = rr.wait(bad)
    assert.is_false(ok)
    assert.matches("attempt to index a nil value", err)
    assert.matches("stack traceback", err)
    assert.same({ true, "still here" }, { rr.wait(good) })
    assert.equal("failed", bad:status())
  end)

  it("wait returns one table per task when given several", function()
    local a = rr.spawn(function() return 1 end)
    local b = rr.spawn(function() error("no") end)
    local ra, rb = rr.wait(a, b)
    assert.same({ true, 1, n = 2 }, ra)
    assert.is_false(rb[1])
  end)

  it("cancels a waiting task: its wait raises 'canceled' and <close> runs", function()
    local closed = false
    local sleeper = rr.spawn(function()
      local guard <close> = setmetatable({}, { __close = function() closed = true end })
      rr.sleep(30)
    end)
    local canceller = rr.spawn(function() rr.sleep(0.01); sleeper:cancel() end)
    local t0 = rr.now()
    local ok, err = rr.wait(sleeper)
    assert.is_false(ok)
    assert.matches("canceled", err)
    assert.is_true(closed)
    assert.is_true(rr.now() - t0 < 5)
    assert.equal("canceled", sleeper:status())
    assert.is_true((rr.wait(canceller)))
  end)

  it("cancels a task that has not started yet", function()
    local ran = false
    local t = rr.spawn(function() ran = true end)
    t:cancel()
    assert.is_false((rr.wait(t)))
    assert.is_false(ran)
  end)

  it("lets a task yield to others with coroutine.yield", function()
    local order = {}
    local a = rr.spawn(function() order[#order + 1] = "a1"; coroutine.yield(); order[#order + 1] = "a2" end)
    local b = rr.spawn(function() order[#order + 1] = "b1"; coroutine.yield(); order[#order + 1] = "b2" end)
    rr.wait(a, b)
    assert.same({ "a1", "b1", "a2", "b2" }, order)
  end)

  it("starts tasks in spawn order and wakes sleepers in deadline order", function()
    local order = {}
    local tasks = {}
    for i, d in ipairs({ 0.06, 0.02, 0.04 }) do
      tasks[i] = rr.spawn(function() rr.sleep(d); order[#order + 1] = d end)
    end
    rr.wait(tasks)
    assert.same({ 0.02, 0.04, 0.06 }, order)
  end)

  it("refuses misuse with an error", function()
    assert.has_error(function() rr.spawn(42) end)
    assert.has_error(function() rr.sleep(-1) end)
    assert.has_error(function() rr.wait("nope") end)
    local t = rr.spawn(function() return rr.wait(rr.current()) end)
    local ok, err = rr.wait(t)
    assert.is_false(ok)
    assert.matches("cannot wait for itself", err)
  end)

  it("keeps rr.now monotonic", function()
    local a = rr.now()
    rr.sleep(0.01)
    assert.is_true(rr.now() - a >= 0.01)
  end)
end)

describe("rrengine signals", function()
  local proc = require("rr.proc")

  it("exits 130 when interrupted with no handler, without waiting for the sleep", function()
    local p = proc.spawn({ engine, "-e", "require('rr').sleep(30)" })
    rr.sleep(0.3)
    p:kill("INT")
    local t0 = rr.now()
    local _, _, res = p:wait()
    assert.equal(130, res.exit_code)
    assert.is_true(rr.now() - t0 < 5)
  end)

  it("hands SIGTERM to a Lua handler, which decides", function()
    local script = [[
      local rr = require('rr')
      local stop = false
      rr.on_signal(function(name) io.write('got ', name, '\n'); io.flush(); stop = true end)
      io.write('ready\n'); io.flush()
      while not stop do rr.sleep(0.01) end
      io.write('clean exit\n')
    ]]
    local lines = {}
    local p
    p = proc.spawn({ engine, "-e", script }, {
      on_line = function(_, line)
        lines[#lines + 1] = line
        if line == "ready" then p:kill("TERM") end
      end,
    })
    local res = p:wait()
    assert.is_truthy(res, "engine exited non-zero")
    assert.same({ "ready", "got SIGTERM", "clean exit" }, lines)
  end)
end)

describe("rrengine command line", function()
  local proc = require("rr.proc")

  it("runs -e code and sets arg like lua does", function()
    local dir = require("rr.fs").mkdtemp("/tmp/rr-loop-spec-")
    local script = dir .. "/s.lua"
    local f = assert(io.open(script, "w"))
    f:write("print(arg[0], arg[1], select('#', ...), ...)")
    f:close()
    local res = assert(proc.run({ engine, script, "one", "two" }))
    assert.equal(script .. "\tone\t2\tone\ttwo\n", res.stdout)
    require("rr.fs").remove_tree(dir)
  end)

  it("prints a one-line error and exits 1; a traceback only with --debug", function()
    local _, _, res = proc.run({ engine, "-e", "error('boom')" })
    assert.equal(1, res.exit_code)
    assert.equal("rrengine: (command line):1: boom\n", res.stderr)
    _, _, res = proc.run({ engine, "--debug", "-e", "error('boom')" })
    assert.matches("stack traceback", res.stderr)
  end)

  it("answers --version and --help, and refuses unknown options with exit 2", function()
    local res = assert(proc.run({ engine, "--version" }))
    assert.matches("^rrengine %d+%.%d+%.%d+", res.stdout)
    res = assert(proc.run({ engine, "--help" }))
    assert.matches("Examples:", res.stdout)
    local _, _, bad = proc.run({ engine, "--frobnicate" })
    assert.equal(2, bad.exit_code)
    assert.matches("unknown option '%-%-frobnicate'", bad.stderr)
  end)

  it("evaluates REPL lines from stdin and survives an error", function()
    local res = assert(proc.run({ engine, "-i" }, { stdin = "1+41\nerror('x')\nprint('after')\n" }))
    assert.matches("42", res.stdout)
    assert.matches("after", res.stdout)
    assert.matches("x", res.stderr)
  end)
end)
