-- Hooks cannot hang the engine: a deadline that holds for tasks that never wait
-- (task:deadline, task:max_instructions), hook calls and hook files bounded by it, stop signals
-- that still stop the engine during a CPU loop, and no blocking calls in hook files. What could
-- hang the engine runs in a child engine with a timeout, so that a regression fails instead of
-- hanging the run.
local rr = require("rr")
local fs = require("rr.fs")
local proc = require("rr.proc")
local hooks = require("rr.hooks")
local helpers = require("spec.support.helpers")
local platform = require("spec.support.platform")

local write = helpers.write

-- A child engine running `script`, given as -e; killed after `timeout` seconds (default 30).
-- on_ready(handle) runs when it prints the line "ready". Returns the result table.
local function engine(script, opts)
  opts = opts or {}
  local p
  p = assert(proc.spawn({ helpers.engine, "-e", script }, {
    timeout = opts.timeout or 30,
    on_line = function(stream, line)
      if stream == "stdout" and line == "ready" and opts.on_ready then opts.on_ready(p) end
    end,
  }))
  local res, _, _, r = p:wait()
  return res or r
end

local dir
setup(function() dir = assert(fs.mkdtemp("/tmp/rr-hooklimits-")) end)
teardown(function() fs.remove_tree(dir) end)

-- Tasks that never wait run in a child engine: see the top of the file.
describe("task:deadline", function()
  it("ends a task that never waits, with ETIMEDOUT and where it was", function()
    local res = engine([[
      local rr = require("rr")
      local t = rr.spawn(function() local n = 0; while true do n = n + 1 end end):deadline(0.2)
      local ok, err, code = rr.wait(t)
      print(ok, code, t:status())
      print(err)
    ]])
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("^false\tETIMEDOUT\tfailed\ntimed out after 0%.2 s\nstack traceback:\n\t%(command line%):2: in function",
      res.stdout)
  end)

  it("cannot be caught by a pcall in the task, nor by one in a C call that calls back", function()
    local res = engine([[
      local rr = require("rr")
      local t = rr.spawn(function()
        while true do pcall(function() while true do end end) end
      end):deadline(0.2)
      print(select(3, rr.wait(t)))
      t = rr.spawn(function()
        pcall(table.sort, { 3, 2, 1 }, function() while true do end end)
        while true do pcall(table.sort, { 3, 2, 1 }, function() while true do end end) end
      end):deadline(0.2)
      print(select(3, rr.wait(t)))
    ]])
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal("ETIMEDOUT\nETIMEDOUT\n", res.stdout)
  end)

  it("ends a task that waits, and its <close> variables run", function()
    local closed = false
    local t <close> = rr.spawn(function()
      local _ <close> = setmetatable({}, { __close = function() closed = true end })
      rr.sleep(3600)
    end)
    t:deadline(0.2)
    local ok, err, code = rr.wait(t)
    assert.is_false(ok)
    assert.equal("ETIMEDOUT", code)
    assert.matches("^timed out after 0%.2 s\nstack traceback:\n", err)
    assert.is_true(closed)
  end)

  it("holds for the tasks it starts", function()
    local child
    finally(function() if child then child:cancel() end end)
    local t <close> = rr.spawn(function()
      child = rr.spawn(function() rr.sleep(3600) end)
      return "parent done"
    end)
    t:deadline(0.2)
    assert.same({ true, "parent done" }, { rr.wait(t) })
    local ok, _, code = rr.wait(child)
    assert.is_false(ok)
    assert.equal("ETIMEDOUT", code)
  end)

  it("changes nothing for a task that finishes in time, and keeps an earlier deadline", function()
    local t <close> = rr.spawn(function() rr.sleep(0.05); return 1, 2 end)
    assert.equal(t, t:deadline(5))
    assert.same({ true, 1, 2 }, { rr.wait(t) })
    local early <close> = rr.spawn(function() rr.sleep(3600) end)
    early:deadline(0.1):deadline(3600)
    assert.equal("ETIMEDOUT", select(3, rr.wait(early)))
  end)

  it("raises for a negative time", function()
    local t <close> = rr.spawn(function() end)
    assert.error_matches(function() t:deadline(-1) end, "bad argument #1 to 'deadline' %(seconds must be >= 0%)")
    assert.is_true(rr.wait(t))
  end)
end)

describe("task:max_instructions", function()
  it("ends an endless loop with ELIMIT and the line it was at", function()
    local res = engine([[
      local rr = require("rr")
      local t = rr.spawn(function()
        local n = 0
        while true do n = n + 1 end
      end):max_instructions(100000)
      local ok, err, code = rr.wait(t)
      print(ok, code)
      print(err)
    ]])
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("^false\tELIMIT\n%(command line%):4: runs more than 100000 instructions %(an endless loop%?%)\n"
      .. "stack traceback:\n\t%(command line%):4: in function", res.stdout)
  end)

  it("raises for a count that is not positive", function()
    local t <close> = rr.spawn(function() end)
    assert.error_matches(function() t:max_instructions(0) end,
      "bad argument #1 to 'max_instructions' %(instructions must be > 0%)")
    assert.is_true(rr.wait(t))
  end)
end)

describe("a hook that never waits", function()
  local cpu_hook
  setup(function()
    cpu_hook = write(dir .. "/cpu.lua", [[
      return { before_restart = function()
        io.write("ready\n"); io.flush()
        while true do end
      end }]])
  end)

  it("is stopped at the hook timeout and reported as a failed hook, in one line", function()
    local res = engine(([[
      local hooks = require("rr.hooks")
      local set = hooks.set({ assert(hooks.load(%q)) })
      set.timeout = 0.3
      local ok, err, full = set:call("before_restart", {})
      print(ok, err)
      print(full:match("stack traceback") and "traceback kept" or full)
      print("the engine goes on")
    ]]):format(cpu_hook))
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal(("ready\nnil\thook before_restart in %s failed: timed out after 0.3s\ntraceback kept\n"
      .. "the engine goes on\n"):format(cpu_hook), res.stdout)
  end)

  it("does not keep SIGTERM from stopping the engine (exit 130, not after the hook timeout)", function()
    local res = engine(([[
      local hooks = require("rr.hooks")
      hooks.TIMEOUT = 600
      local set = hooks.set({ assert(hooks.load(%q)) })
      print(set:call("before_restart", {}))
    ]]):format(cpu_hook), { on_ready = function(p) p:kill("TERM") end })
    assert.is_false(res.timed_out)
    assert.equal(130, res.exit_code, res.stderr)
    assert.equal("ready\n", res.stdout)
  end)

  it("lets a Lua signal handler run at once; the hook still ends at its timeout", function()
    local res = engine(([[
      local rr = require("rr")
      local hooks = require("rr.hooks")
      rr.on_signal(function(name) io.write("handler: ", name, "\n"); io.flush() end)
      local set = hooks.set({ assert(hooks.load(%q)) })
      set.timeout = 3
      local ok, err = set:call("before_restart", {})
      print(err)
    ]]):format(cpu_hook), { on_ready = function(p) p:kill("TERM") end })
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal(("ready\nhandler: SIGTERM\nhook before_restart in %s failed: timed out after 3s\n"):format(cpu_hook),
      res.stdout)
  end)
end)

describe("a rolling run with a hook that never waits", function()
  local p
  setup(function()
    p = platform.new({ { name = "api", http = true }, { name = "b" } })
    p:start()
  end)
  teardown(function() p:teardown() end)

  it("stops on SIGTERM: the hook fails at its timeout, nothing is touched, nothing else starts", function()
    local hook = write(p.dir .. "/cpu.lua", [[
      return { before_restart = function()
        io.stderr:write("hook looping\n"); io.stderr:flush()
        while true do end
      end }]])
    -- plans/rolling.lua with a short hook timeout
    local plan = write(p.dir .. "/plan.lua", ([[
      require("rr.hooks").TIMEOUT = 1
      return assert(loadfile(%q))(...)
    ]]):format(fs.realpath("plans/rolling.lua")))
    local pid, pid_b = p:props("api").MainPID, p:props("b").MainPID
    local sent = false
    local res = p:cli({ "--hooks", hook }, {
      plan = plan, timeout = 60,
      spawned = function(h) p.handle = h end,
      on_line = function(stream, line)
        if stream == "stderr" and line == "hook looping" and not sent then
          sent = true
          p.handle:kill("TERM")
        end
      end,
    })
    assert.is_true(sent, res.stdout .. res.stderr)
    assert.is_false(res.timed_out)
    assert.equal(130, res.exit_code, res.stdout .. res.stderr)
    assert.equal("SIGTERM", p:last_event("INTERRUPTED").signal)
    assert.matches("hook before_restart in .*cpu%.lua failed: timed out after 1s",
      p:last_event("HOOK_FAILED", "api").error)
    assert.matches("interrupted", p:last_event("SERVICE_SKIPPED", "b").reason)
    assert.equal(pid, p:props("api").MainPID)
    assert.equal(pid_b, p:props("b").MainPID)
  end)
end)

describe("a hook file", function()
  it("cannot run a command or open a pipe: the error names rr.proc.run, and nothing ran", function()
    local marker = dir .. "/ran"
    local shell = dir .. "/shell.lua"
    local h = assert(hooks.load(write(shell, (([[
      return { before_restart = function(how)
        if how == "os.execute" then os.execute("touch %s") end
        if how == "io.popen" then io.popen("touch %s"):close() end
        if how == "require" then require("os").execute("touch %s") end
        if how == "_G" then _G.os.execute("touch %s") end
        if how == "load" then load("os.execute('touch %s')")() end
      end }]]):gsub("%%s", marker)))))
    local set = hooks.set({ h })
    for _, how in ipairs({ "os.execute", "io.popen", "require", "_G", "load" }) do
      local ok, err = set:call("before_restart", how)
      assert.is_nil(ok, how)
      local call = how == "io.popen" and "io.popen" or "os.execute"
      assert.matches(call .. " would block the whole engine", err, nil, true)
      assert.matches("rr.proc.run(argv)", err, nil, true)
      if how ~= "load" then -- the hook's own line, not the guard's
        assert.matches(shell:gsub("%p", "%%%0") .. ":%d+: " .. call:gsub("%p", "%%%0"), err)
      end
    end
    assert.is_false(fs.exists(marker))
  end)

  it("cannot open a FIFO or read standard input", function()
    local fifo = dir .. "/fifo"
    helpers.run({ "mkfifo", fifo })
    local h = write(dir .. "/reader.lua", ([[
      return { before_restart = function(how)
        if how == "fifo" then return io.open(%q) end
        if how == "lines of fifo" then for l in io.lines(%q) do end end
        if how == "io.read" then return io.read("l") end
        if how == "io.lines" then for l in io.lines() do end end
        if how == "io.stdin" then return io.stdin:read("l") end
        if how == "io.input" then return io.input():read("l") end
      end }]]):format(fifo, fifo))
    local res = engine(([[
      local hooks = require("rr.hooks")
      local set = hooks.set({ assert(hooks.load(%q)) })
      for _, how in ipairs({ "fifo", "lines of fifo", "io.read", "io.lines", "io.stdin", "io.input" }) do
        local ok, err = set:call("before_restart", how)
        print(how, ok, err:match("would block the whole engine[^:]*"))
      end
    ]]):format(h))
    assert.equal(0, res.exit_code, res.stderr)
    local why_fifo = ("would block the whole engine (%s is a FIFO, a socket or a device, not a regular file)"):format(fifo)
    local why_stdin = "would block the whole engine waiting for standard input"
    assert.equal(table.concat({
      "fifo\tnil\t" .. why_fifo, "lines of fifo\tnil\t" .. why_fifo, "io.read\tnil\t" .. why_stdin,
      "io.lines\tnil\t" .. why_stdin, "io.stdin\tnil\t" .. why_stdin, "io.input\tnil\t" .. why_stdin, "",
    }, "\n"), res.stdout)
  end)

  it("keeps everything else of the engine's globals, and its own globals to itself", function()
    local data = write(dir .. "/data.txt", "line one\n")
    local h = assert(hooks.load(write(dir .. "/normal.lua", ([[
      local fs = require("rr.fs")
      local cjson = require("cjson")
      counter = 0
      return { before_restart = function(svc)
        counter = counter + 1
        local f = assert(io.open(%q)); local first = f:read("l"); f:close()
        local lines = 0
        for _ in io.lines(%q) do lines = lines + 1 end
        local out = assert(io.open("/dev/null", "w")); out:write("x"); out:close()
        assert(os.getenv("PATH") and os.time() and fs.stat(%q).type == "file")
        assert(string.format("%%s/%%d", svc.name, #table.concat({ "a", "b" })) == "api/2")
        assert(cjson.decode("[1]")[1] == 1 and math.max(1, 2) == 2)
        return first == "line one" and lines == 1 and counter == 1
      end }]]):format(data, data, data))))
    assert.is_true(hooks.set({ h }):call("before_restart", { name = "api" }))
    assert.is_nil(rawget(_G, "counter"))
    assert.is_true(os.execute("true")) -- the engine's own os is untouched
  end)

  it("that loops forever at load time fails to load within hooks.LOAD_TIMEOUT", function()
    local looping = write(dir .. "/load-loop.lua", "while true do end\n")
    local res = engine(([[
      local hooks = require("rr.hooks")
      hooks.LOAD_TIMEOUT = 0.3
      print(hooks.load(%q))
    ]]):format(looping))
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal(("nil\thook script %s did not finish loading within 0.3 s\tETIMEDOUT\n"):format(looping), res.stdout)
  end)

  it("that waits forever, or loops over slow C calls, at load time fails to load too", function()
    local waiting = write(dir .. "/load-wait.lua", "require('rr').sleep(3600)\nreturn {}\n")
    -- each call is short; the loop is not
    local slow = write(dir .. "/load-slow.lua", "for _ = 1, 1e9 do ('a'):rep(2000):find('.-b') end\nreturn {}\n")
    local res = engine(([[
      local hooks = require("rr.hooks")
      hooks.LOAD_TIMEOUT = 0.3
      print(select(3, hooks.load(%q)))
      print(select(3, hooks.load(%q)))
    ]]):format(waiting, slow))
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal("ETIMEDOUT\nETIMEDOUT\n", res.stdout)
  end)

  it("that is a FIFO is refused without blocking", function()
    local fifo = dir .. "/hook-fifo"
    helpers.run({ "mkfifo", fifo })
    local res = engine(("print(require('rr.hooks').load(%q))"):format(fifo))
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal(("nil\thook script %s: cannot read %s: not a regular file (a FIFO, a socket or a device)\tEINVAL\n")
      :format(fifo, fifo), res.stdout)
  end)
end)
