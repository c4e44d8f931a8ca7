-- rr.loop: tasks on the one sd-event loop.
local rr = require("rr")
local fs = require("rr.fs")

local engine = os.getenv("RR_ENGINE") or arg[-1]

local function proc_run(argv)
  return require("rr.proc").run(argv, { timeout = 60 })
end

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

  it("wait returns one table per task when given a list, whatever its length", function()
    local a = rr.spawn(function() return 1 end)
    local b = rr.spawn(function() error("no") end)
    local r = rr.wait({ a, b })
    assert.same({ true, 1, n = 2 }, r[1])
    assert.is_false(r[2][1])
    local one = rr.spawn(function() return 2 end)
    assert.same({ { true, 2, n = 2 } }, rr.wait({ one }))
  end)

  it("wait of one task gives its outcome; several tasks must be a list (one shape per form)", function()
    assert.same({ true, 7 }, { rr.wait(rr.spawn(function() return 7 end)) })
    local a, b = rr.spawn(function() end), rr.spawn(function() end)
    assert.has_error(function() rr.wait(a, b) end, "rr.wait: give several tasks as a list: rr.wait{t1, t2, ...}")
    rr.wait({ a, b })
  end)

  it("join gives a task's outcome in the failure form of every primitive, the code from its status", function()
    assert.same({ true, 3 }, { rr.join(rr.spawn(function() return 3 end)) })
    local failed = table.pack(rr.join(rr.spawn(function() error("no way", 0) end)))
    assert.same({ nil, "no way", "EFAILED" }, { failed[1], failed[2], failed[3] })
    local t = rr.spawn(function() rr.sleep(5) end)
    t:cancel()
    local _, msg, code = rr.join(t)
    assert.equal("ECANCELED", code, msg)
  end)

  it("a task cancelled before it ever ran leaves the ready queue (collected, never touched again)", function()
    -- found by ASan: a never-started task finished as cancelled stayed queued, was collected,
    -- and the next scheduler turn read it
    for _ = 1, 200 do
      local t = rr.spawn(function() end)
      t:cancel()
    end
    collectgarbage()
    collectgarbage()
    local after = rr.spawn(function() return "still scheduling" end)
    assert.same({ true, "still scheduling" }, { rr.wait(after) })
  end)

  it("race: the first to finish wins, the others are cancelled and gone before it returns", function()
    local slow
    local i, v = rr.race({
      function() slow = rr.current(); rr.sleep(5) end,
      function() rr.sleep(0.01); return "fast" end,
    })
    assert.equal(2, i)
    assert.equal("fast", v)
    assert.equal("canceled", slow:status())
    assert.same({ nil, "timed out after 0.02s", "ETIMEDOUT" }, { rr.race({ function() rr.sleep(5) end }, 0.02) })
    local _, err, code = rr.race({ function() error("broken", 0) end, function() rr.sleep(5) end })
    assert.equal("broken", err)
    assert.equal("EFAILED", code)
    -- the caller cancelled: its children go with it
    local child
    local outer = rr.spawn(function() rr.race({ function() child = rr.current(); rr.sleep(5) end }) end)
    rr.sleep(0.01)
    outer:cancel()
    rr.wait(outer)
    rr.sleep(0.01)
    assert.equal("canceled", child:status())
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
    rr.wait({ a, b })
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

  -- Lua gives a coroutine and the main thread only a small stack: every value a task hands
  -- over (its arguments, its results) must be given room first.
  it("delivers every one of 5000 results of a task through rr.wait", function()
    local t = rr.spawn(function()
      local values = {}
      for i = 1, 5000 do values[i] = i end
      rr.sleep(0)
      return table.unpack(values)
    end)
    local r = table.pack(rr.wait(t))
    assert.equal(5001, r.n)
    assert.is_true(r[1])
    for i = 1, 5000 do
      assert.equal(i, r[i + 1])
    end
    local again = table.pack(t:result())
    assert.equal(5001, again.n)
    assert.equal(5000, again[5001])
  end)

  it("hands 5000 arguments to a task", function()
    local args = {}
    for i = 1, 5000 do args[i] = i end
    local t = rr.spawn(function(...)
      local n, sum = select("#", ...), 0
      for i = 1, n do sum = sum + select(i, ...) end
      return n, sum
    end, table.unpack(args))
    assert.same({ true, 5000, 5000 * 5001 // 2 }, { rr.wait(t) })
  end)

  it("finishes 3000 failing tasks waited for as one list from the top level", function()
    -- rr.wait{...} fills the waiting thread's stack with the tasks; each failure's traceback is
    -- then built beside them.
    local res, err = proc_run({ engine, "-e", [[
      local rr = require("rr")
      local tasks = {}
      for i = 1, 3000 do tasks[i] = rr.spawn(function() rr.sleep(0) error("task " .. i, 0) end) end
      local results = rr.wait(tasks)
      local bad = 0
      for i, r in ipairs(results) do
        if r[1] ~= false or not r[2]:find("^task " .. i .. "\n") then bad = bad + 1 end
      end
      print(#results, bad)
    ]] })
    assert.is_truthy(res, err)
    assert.equal("3000\t0\n", res.stdout)
  end)

  it("keeps rr.now monotonic", function()
    local a = rr.now()
    rr.sleep(0.01)
    assert.is_true(rr.now() - a >= 0.01)
  end)
end)

describe("rrengine signals", function()
  local proc = require("rr.proc")

  -- A child engine that prints "ready" once its signal sources are in place (a line, not a
  -- sleep, says when to send the signal).
  local function engine_until_ready(script, sig)
    local lines, p = {}, nil
    p = proc.spawn({ engine, "-e", script }, {
      on_line = function(stream, line)
        if stream ~= "stdout" then return end
        lines[#lines + 1] = line
        if line == "ready" then p:kill(sig) end
      end,
    })
    local t0 = rr.now()
    local ok_res, _, _, failed_res = p:wait()
    return lines, ok_res or failed_res, rr.now() - t0
  end

  for _, sig in ipairs({ "INT", "HUP" }) do
    it(("exits 130 on SIG%s with no handler, without waiting for the sleep"):format(sig), function()
      local lines, res, took = engine_until_ready("io.write('ready\\n'); io.flush(); require('rr').sleep(30)", sig)
      assert.same({ "ready" }, lines)
      assert.equal(130, res.exit_code)
      assert.is_nil(res.signal)
      assert.is_true(took < 5)
    end)
  end

  -- An SSH session that drops sends SIGHUP: a run gets the same chance to finish (or roll back)
  -- the service in flight as with SIGTERM.
  for _, sig in ipairs({ "TERM", "HUP" }) do
    it(("hands SIG%s to a Lua handler, which decides"):format(sig), function()
      local script = [[
        local rr = require('rr')
        local waiter = rr.spawn(function() rr.sleep(3600) end)
        rr.on_signal(function(name) io.write('got ', name, '\n'); io.flush(); waiter:cancel() end)
        io.write('ready\n'); io.flush()
        rr.wait(waiter)
        io.write('clean exit\n')
      ]]
      local lines, res = engine_until_ready(script, sig)
      assert.equal(0, res.exit_code)
      assert.same({ "ready", "got SIG" .. sig, "clean exit" }, lines)
    end)
  end

  it("ignores SIGPIPE itself; children of rr.proc get every signal at its default, none blocked", function()
    local ign = assert(fs.read("/proc/self/status")):match("\nSigIgn:%s*(%x+)")
    assert.is_true(tonumber(ign, 16) & (1 << 12) ~= 0, "SIGPIPE (13) is not ignored: SigIgn " .. ign)
    local res = assert(proc.run({ "grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status" }))
    local blk, cign = res.stdout:match("^SigBlk:%s*(%x+)\nSigIgn:%s*(%x+)\n$")
    assert.equal("0000000000000000", blk)
    -- signals 1-31 at their default (glibc's own real-time signals 32 and 33 are not ours)
    assert.equal(0, tonumber(cign, 16) & 0x7fffffff, "ignored in the child: SigIgn " .. cign)
    local _, err, _, r = proc.run({ "sh", "-c", "kill -PIPE $$; echo survived" })
    assert.equal("SIGPIPE", r.signal, err)
    assert.equal("", r.stdout)
  end)

  it("keeps going when the reader of its stdout went away (| head -n1)", function()
    local dir = assert(fs.mkdtemp("/tmp/rr-loop-spec-"))
    local script = dir .. "/pipe.lua"
    local f = assert(io.open(script, "w"))
    f:write([[
      local marker = ...
      local fails, last = 0, nil
      for i = 1, 100000 do
        local ok, err = io.write(("line %d\n"):format(i))
        if not ok then fails = fails + 1; last = err end
      end
      print("print does not raise either")
      io.stdout:flush()
      local p = assert(require("rr.proc").run({ "true" }))
      local out = assert(io.open(marker, "w"))
      out:write(("survived: %d failed writes, last %s; child exit %d\n"):format(fails, tostring(last), p.exit_code))
      out:close()
    ]])
    f:close()
    -- pipefail: the pipeline's status is the engine's when it fails (141 = killed by SIGPIPE)
    local res, err = proc.run({ "bash", "-c", 'set -o pipefail; "$0" "$1" "$2" | head -n 1',
      engine, script, dir .. "/marker" })
    assert.is_truthy(res, err)
    assert.equal("line 1\n", res.stdout)
    local text = fs.read(dir .. "/marker")
    assert.is_truthy(text, "the engine died before its last line")
    assert.matches("^survived: [1-9]%d* failed writes, last Broken pipe; child exit 0\n$", text)
    fs.remove_tree(dir)
  end)

  it("finishes a rolling restart whose output pipe closed after the first line", function()
    local platform = require("spec.support.platform")
    local p = platform.new({ { name = "api", http = true } })
    p:start()
    local pid = p:props("api").MainPID
    local res, err = proc.run({ "bash", "-c",
      'set -o pipefail; "$0" plans/rolling.lua --user --services "$1" --events "$2" | head -n 1',
      engine, p.services_file, p.events_file }, { env = { XDG_STATE_HOME = p.xdg_state }, timeout = 60 })
    local ok, why = pcall(function()
      assert.is_truthy(res, err)
      assert.matches("^[^\n]*plan: 1 service%(s%) in order: api\n$", res.stdout)
      assert.equal("success", p:last_event("PLAN_END").result)
      assert.is_truthy(p:last_event("SERVICE_RESTART_SUCCESS", "api"))
      local props = p:props("api")
      assert.equal("active", props.ActiveState)
      assert.are_not.equal(pid, props.MainPID)
    end)
    p:teardown()
    assert(ok, why)
  end)
end)

describe("os.exit", function()
  local proc = require("rr.proc")

  local function run(script)
    local t0 = rr.now()
    local res, _, _, r = proc.run({ engine, "-e", script }, { timeout = 20 })
    res = res or r
    assert.is_true(rr.now() - t0 < 5, "os.exit waited for the sleeps")
    return res
  end

  it("from a task: the task and the top level unwind (<close> runs), others are cancelled, exit code kept", function()
    local res = run([[
      local rr = require('rr')
      local function guard(name)
        return setmetatable({}, { __close = function() io.write(name, ' closed\n') end })
      end
      rr.spawn(function()
        local g <close> = guard('other task')
        rr.sleep(30)
      end)
      rr.spawn(function()
        local g <close> = guard('exiting task')
        rr.sleep(0.05)
        os.exit(7)
        io.write('not reached\n')
      end)
      local top <close> = guard('top level')
      rr.sleep(30)
      io.write('top level not reached\n')
    ]])
    assert.equal(7, res.exit_code)
    assert.equal("exiting task closed\ntop level closed\nother task closed\n", res.stdout)
    assert.equal("", res.stderr) -- no error line, no sanitizer report
  end)

  it("from a task whose code catches the error: its next wait does not return, the exit happens", function()
    local res = run([[
      local rr = require('rr')
      local t = rr.spawn(function()
        local ok, err = pcall(os.exit, 3)
        io.write('caught: ', tostring(ok), ' ', err:match('os%.exit%(3%): exiting') or err, '\n')
        rr.sleep(1)
        io.write('not reached\n')
      end)
      rr.wait(t)
      io.write('top level not reached\n')
    ]])
    assert.equal(3, res.exit_code)
    assert.equal("caught: false os.exit(3): exiting\n", res.stdout)
    assert.equal("", res.stderr)
  end)

  it("from a signal handler task, and at the top level as before", function()
    local res = run([[
      local rr = require('rr')
      rr.on_signal(function(name) io.write(name, '\n'); os.exit(4) end)
      require('rr.proc').run({ 'kill', '-TERM', tostring(require('rr.fs').getpid()) })
      rr.sleep(30)
    ]])
    assert.equal(4, res.exit_code)
    assert.equal("SIGTERM\n", res.stdout)
    res = run("local rr = require('rr'); rr.spawn(function() local g <close> = setmetatable({}, "
      .. "{ __close = function() io.write('task closed\\n') end }); rr.sleep(30) end); rr.sleep(0.01); os.exit(5)")
    assert.equal(5, res.exit_code)
    assert.equal("task closed\n", res.stdout)
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
    local _, _, _, res = proc.run({ engine, "-e", "error('boom')" })
    assert.equal(1, res.exit_code)
    assert.equal("rrengine: (command line):1: boom\n", res.stderr)
    _, _, _, res = proc.run({ engine, "--debug", "-e", "error('boom')" })
    assert.matches("stack traceback", res.stderr)
  end)

  it("answers --version and --help, and refuses unknown options with exit 2", function()
    local res = assert(proc.run({ engine, "--version" }))
    assert.matches("^rrengine %d+%.%d+%.%d+", res.stdout)
    res = assert(proc.run({ engine, "--help" }))
    assert.matches("Examples:", res.stdout)
    local _, _, _, bad = proc.run({ engine, "--frobnicate" })
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
