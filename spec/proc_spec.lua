-- Specs for rr.proc (engine/proc.c): real processes, run with the engine as the interpreter:
--   RRENGINE_ROOT=$PWD ./rrengine /usr/bin/busted spec/proc_spec.lua
local proc = require("rr.proc")
local rr = require("rr")

-- A fresh temporary directory (mktemp -d through rr.proc itself).
local function tmpdir()
  local res = assert(proc.run({ "mktemp", "-d" }))
  return (res.stdout:gsub("\n$", ""))
end

local function rmdir(dir)
  assert(proc.run({ "rm", "-rf", "--", dir }))
end

local function exists(path)
  local f = io.open(path, "r")
  if f then f:close() end
  return f ~= nil
end

local function read(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- Is the process alive? A zombie counts as dead: orphans are reparented to PID 1, which in a
-- container may not reap them.
local function alive(pid)
  local stat = read("/proc/" .. pid .. "/stat")
  if not stat then return false end
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= "Z" and state ~= "X"
end

-- Poll (on the loop) until fn() is true or the deadline passes.
local function eventually(fn, secs)
  local deadline = rr.now() + (secs or 5)
  while rr.now() < deadline do
    if fn() then return true end
    rr.sleep(0.01)
  end
  return fn()
end

-- The PID written to a file by a child, once it is there.
local function pid_from(path)
  assert(eventually(function()
    local s = read(path)
    return s and s:match("^%d+\n") ~= nil
  end), "no PID in " .. path)
  return tonumber(read(path):match("^(%d+)"))
end

describe("rr.proc", function()
  local dir

  before_each(function() dir = tmpdir() end)
  after_each(function() rmdir(dir) end)

  describe("run", function()
    it("returns the result of a process that exited 0", function()
      local res, err = proc.run({ "/bin/echo", "hello", "world" })
      assert.is_nil(err)
      assert.equal(0, res.exit_code)
      assert.is_nil(res.signal)
      assert.is_false(res.timed_out)
      assert.equal("hello world\n", res.stdout)
      assert.equal("", res.stderr)
      assert.same({ stdout = false, stderr = false }, res.truncated)
      assert.is_number(res.pid)
      assert.is_true(res.duration >= 0 and res.duration < 5)
    end)

    it("reports a non-zero exit code", function()
      local res, err, _, r = proc.run({ "/bin/sh", "-c", "echo out; echo err >&2; exit 3" })
      assert.is_nil(res)
      assert.equal("/bin/sh exited with code 3", err)
      assert.equal(3, r.exit_code)
      assert.is_nil(r.signal)
      assert.equal("out\n", r.stdout)
      assert.equal("err\n", r.stderr)
    end)

    it("reports a process killed by a signal", function()
      local res, err, _, r = proc.run({ "/bin/sh", "-c", "kill -TERM $$" })
      assert.is_nil(res)
      assert.equal("/bin/sh killed by SIGTERM", err)
      assert.equal("SIGTERM", r.signal)
      assert.is_nil(r.exit_code)
      assert.is_false(r.timed_out)
    end)

    it("does not interpret its arguments", function()
      local res = assert(proc.run({ "/bin/echo", "$(touch X)", "`touch Y`", "a;b", "*" }, { cwd = dir }))
      assert.equal("$(touch X) `touch Y` a;b *\n", res.stdout)
      assert.is_false(exists(dir .. "/X"))
      assert.is_false(exists(dir .. "/Y"))
    end)

    it("says ENOENT for a program that does not exist", function()
      local res, err, code = proc.run({ "/nonexistent/program", "x" })
      assert.is_nil(res)
      assert.equal("cannot run /nonexistent/program: No such file or directory", err)
      assert.equal("ENOENT", code)

      res, err, code = proc.run({ "rr-no-such-program-anywhere" })
      assert.is_nil(res)
      assert.equal("cannot run rr-no-such-program-anywhere: No such file or directory", err)
      assert.equal("ENOENT", code)
    end)

    it("says EACCES for a file that is not executable", function()
      local path = dir .. "/script"
      local f = assert(io.open(path, "w"))
      f:write("#!/bin/sh\necho hi\n")
      f:close()
      local res, err, code = proc.run({ path })
      assert.is_nil(res)
      assert.equal("cannot run " .. path .. ": Permission denied", err)
      assert.equal("EACCES", code)
    end)

    it("honours cwd, and names a bad one", function()
      local res = assert(proc.run({ "pwd", "-P" }, { cwd = dir }))
      local real = assert(proc.run({ "realpath", dir })).stdout
      assert.equal(real, res.stdout)

      local r, err, code = proc.run({ "pwd" }, { cwd = dir .. "/missing" })
      assert.is_nil(r)
      assert.equal("cannot run pwd in " .. dir .. "/missing: No such file or directory", err)
      assert.equal("ENOENT", code)
    end)

    it("merges env over the environment, or starts empty with env_clear", function()
      local home = os.getenv("HOME") or ""
      local res = assert(proc.run({ "/bin/sh", "-c", 'echo "$RR_A|$RR_B|$HOME"' },
        { env = { RR_A = "one two", RR_B = 42 } }))
      assert.equal("one two|42|" .. home .. "\n", res.stdout)

      res = assert(proc.run({ "/usr/bin/env" }, { env_clear = true, env = { A = "1" } }))
      assert.equal("A=1\n", res.stdout)

      res = assert(proc.run({ "/bin/sh", "-c", 'echo "${HOME-unset}"' }, { env = { HOME = false } }))
      assert.equal("unset\n", res.stdout)
    end)

    it("writes the stdin string to the process", function()
      local res = assert(proc.run({ "cat" }, { stdin = "line 1\nline 2" }))
      assert.equal("line 1\nline 2", res.stdout)

      -- More than a pipe holds: written as the child reads.
      local big = string.rep("0123456789abcdef", 65536) -- 1 MiB
      res = assert(proc.run({ "wc", "-c" }, { stdin = big }))
      assert.equal(tostring(#big), res.stdout:match("%d+"))
    end)

    it("gives /dev/null as stdin by default", function()
      local res = assert(proc.run({ "cat" }, { timeout = 5 }))
      assert.equal("", res.stdout)
    end)

    it("survives a child that does not read its stdin", function()
      local big = string.rep("x", 1024 * 1024)
      local res = assert(proc.run({ "/bin/sh", "-c", "exec 0<&-; echo done" }, { stdin = big }))
      assert.equal("done\n", res.stdout)
    end)

    it("bounds the captured output", function()
      local res = assert(proc.run({ "/bin/sh", "-c", "seq 1 1000; echo e >&2" }, { max_capture = 10 }))
      assert.equal("1\n2\n3\n4\n5\n", res.stdout)
      assert.is_true(res.truncated.stdout)
      assert.is_false(res.truncated.stderr)

      res = assert(proc.run({ "seq", "1", "10" }, { capture = false }))
      assert.equal("", res.stdout)
    end)

    it("kills the whole process group at the timeout", function()
      local pidfile = dir .. "/grandchild"
      local t0 = rr.now()
      local res, err, _, r = proc.run({ "/bin/sh", "-c", 'sleep 1000 & echo $! > "$0"; sleep 1000', pidfile },
        { timeout = 0.5 })
      local took = rr.now() - t0
      assert.is_nil(res)
      assert.equal("/bin/sh timed out after 0.5 s (killed)", err)
      assert.is_true(r.timed_out)
      assert.equal("SIGTERM", r.signal)
      assert.is_true(took >= 0.5 and took < 2, "took " .. took)
      local gpid = pid_from(pidfile)
      assert.is_true(eventually(function() return not alive(gpid) end, 2), "grandchild " .. gpid .. " survived")
    end)

    it("SIGKILLs the group after kill_grace when TERM is ignored", function()
      local pidfile = dir .. "/grandchild"
      local t0 = rr.now()
      -- The grandchild ignores TERM (and the leader does not): it is killed when the leader dies.
      local _, _, _, r = proc.run({ "/bin/sh", "-c",
        [[(trap '' TERM; exec sleep 1000) & echo $! > "$0"; sleep 1000]], pidfile }, { timeout = 0.3 })
      assert.is_true(r.timed_out)
      local gpid = pid_from(pidfile)
      assert.is_true(eventually(function() return not alive(gpid) end, 1), "grandchild " .. gpid .. " survived")

      -- Everything ignores TERM: KILL after the grace.
      t0 = rr.now()
      local res, err
      res, err, _, r = proc.run({ "/bin/sh", "-c", "trap '' TERM; sleep 1000 & wait; sleep 1000" },
        { timeout = 0.3, kill_grace = 0.3 })
      local took = rr.now() - t0
      assert.is_nil(res)
      assert.equal("/bin/sh timed out after 0.3 s (killed)", err)
      assert.is_true(r.timed_out)
      assert.equal("SIGKILL", r.signal)
      assert.is_true(took >= 0.6 and took < 2, "took " .. took)
    end)

    it("does not hang on a background grandchild that keeps the pipes open", function()
      local t0 = rr.now()
      local res = assert(proc.run({ "/bin/sh", "-c", "sleep 30 & echo $!; echo done" }))
      assert.is_true(rr.now() - t0 < 2)
      local gpid, rest = res.stdout:match("^(%d+)\n(.*)$")
      assert.equal("done\n", rest)
      assert.is_true(alive(tonumber(gpid))) -- left alone: it may be a daemon started on purpose
      assert(proc.run({ "kill", gpid }))
    end)

    it("runs 20 processes at once from 20 tasks", function()
      local tasks = {}
      local t0 = rr.now()
      for i = 1, 20 do
        tasks[i] = rr.spawn(function()
          local res = assert(proc.run({ "/bin/sh", "-c", "sleep 0.3; echo " .. i }))
          return res.stdout
        end)
      end
      local results = rr.wait(tasks)
      for i = 1, 20 do
        assert.is_true(results[i][1], tostring(results[i][2]))
        assert.equal(i .. "\n", results[i][2])
      end
      assert.is_true(rr.now() - t0 < 3, "not concurrent: " .. (rr.now() - t0))
    end)

    it("kills the process when its task is canceled", function()
      local pidfile = dir .. "/pid"
      local task = rr.spawn(function()
        return proc.run({ "/bin/sh", "-c", 'echo $$ > "$0"; exec sleep 1000', pidfile })
      end)
      local pid = pid_from(pidfile)
      assert.is_true(alive(pid))
      task:cancel()
      assert.is_false(rr.wait(task))
      assert.is_true(eventually(function() return not alive(pid) end, 2))
    end)

    it("raises on misuse", function()
      assert.has_error(function() proc.run("ls") end)
      assert.has_error(function() proc.run({}) end)
      assert.has_error(function() proc.run({ "ls" }, { tiemout = 3 }) end)
      assert.has_error(function() proc.run({ "ls" }, { timeout = -1 }) end)
      assert.has_error(function() proc.run({ "ls" }, { env = { ["A=B"] = "x" } }) end)
      assert.has_error(function() proc.run({ "ls", {} }) end)
    end)
  end)

  describe("on_line", function()
    it("delivers stdout lines in order", function()
      local got = {}
      local res = assert(proc.run({ "seq", "1", "1000" }, {
        on_line = function(stream, line) got[#got + 1] = stream .. ":" .. line end,
      }))
      assert.equal(1000, #got)
      for i = 1, 1000 do assert.equal("stdout:" .. i, got[i]) end
      assert.equal(3893, #res.stdout) -- captured as well
    end)

    it("tags stderr lines and delivers a final unterminated line", function()
      local got = {}
      assert(proc.run({ "/bin/sh", "-c", "echo out; sleep 0.05; echo err >&2; sleep 0.05; printf tail" }, {
        on_line = function(stream, line) got[#got + 1] = { stream, line } end,
      }))
      assert.same({ { "stdout", "out" }, { "stderr", "err" }, { "stdout", "tail" } }, got)
    end)

    it("splits very long lines", function()
      local sizes = {}
      assert(proc.run({ "/bin/sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x; echo; echo short" }, {
        capture = false,
        on_line = function(_, line) sizes[#sizes + 1] = #line end,
      }))
      assert.same({ 65536, 65536, 65536, 200000 - 3 * 65536, 5 }, sizes)
    end)

    it("stops reading while too many callbacks are pending (the child waits)", function()
      local running, max_running, done = 0, 0, 0
      assert(proc.run({ "seq", "1", "60000" }, {
        capture = false,
        on_line = function()
          running = running + 1
          if running > max_running then max_running = running end
          rr.sleep(0.05)
          running = running - 1
          done = done + 1
        end,
      }))
      assert.equal(60000, done)
      assert.is_true(max_running < 20000, "all at once: " .. max_running)
    end)

    it("survives a callback that raises, and the engine prints that task's error", function()
      -- In a child engine: the error it prints on purpose is checked here, not shown in the
      -- suite's output (where it would look like a real failure).
      local script = [[
        local seen = 0
        local res = assert(require("rr.proc").run({ "seq", "1", "3" }, {
          on_line = function(_, line)
            seen = seen + 1
            if line == "2" then error("callback failed on purpose") end
          end,
        }))
        io.write(seen, "|", res.stdout)
      ]]
      local res = assert(proc.run({ require("spec.support.helpers").engine, "-e", script }, { timeout = 60 }))
      assert.equal("3|1\n2\n3\n", res.stdout)
      assert.matches("^rrengine: task %d+ failed: [^\n]*: callback failed on purpose\n", res.stderr)
      local _, reports = res.stderr:gsub("rrengine: task", "")
      assert.equal(1, reports)
    end)

    it("lets the callback wait, and run returns after every callback returned", function()
      local got = {}
      assert(proc.run({ "seq", "1", "5" }, {
        on_line = function(_, line)
          rr.sleep(0.02)
          got[#got + 1] = tonumber(line)
        end,
      }))
      table.sort(got)
      assert.same({ 1, 2, 3, 4, 5 }, got)
    end)
  end)

  describe("spawn", function()
    it("gives a handle to kill and wait", function()
      local p = assert(proc.spawn({ "sleep", "100" }))
      assert.is_number(p:pid())
      assert.is_true(p:running())
      assert.matches("^rr.proc.process %d+ %(sleep, running%)$", tostring(p))
      assert.is_true(p:kill())
      local res, err, _, r = p:wait()
      assert.is_nil(res)
      assert.equal("sleep killed by SIGTERM", err)
      assert.equal("SIGTERM", r.signal)
      assert.equal(p:pid(), r.pid)
      assert.is_false(p:running())
      -- Waiting again returns the same; signalling an exited process fails softly.
      assert.equal("sleep killed by SIGTERM", select(2, p:wait()))
      local ok, msg, code = p:kill("KILL")
      assert.is_nil(ok)
      assert.matches("has exited", msg)
      assert.equal("ESRCH", code)
      p:close()
      assert.equal("rr.proc.process (closed)", tostring(p))
    end)

    it("accepts signal names and numbers", function()
      for _, sig in ipairs({ "KILL", "SIGKILL", 9 }) do
        local p = assert(proc.spawn({ "sleep", "100" }))
        assert.is_true(p:kill(sig))
        assert.equal("SIGKILL", select(4, p:wait()).signal)
      end
      local p = assert(proc.spawn({ "sleep", "100" }))
      assert.has_error(function() p:kill("NOPE") end)
      p:close()
    end)

    it("lets several tasks wait for the same process", function()
      local p = assert(proc.spawn({ "/bin/sh", "-c", "sleep 0.2; echo hi" }))
      local a = rr.spawn(function() return p:wait().stdout end)
      local b = rr.spawn(function() return p:wait().stdout end)
      local results = rr.wait({ a, b })
      assert.same({ true, "hi\n", n = 2 }, results[1])
      assert.same({ true, "hi\n", n = 2 }, results[2])
    end)

    it("kills the process group when the handle is closed", function()
      local pidfile = dir .. "/grandchild"
      local pid
      do
        local p <close> = assert(proc.spawn({ "/bin/sh", "-c", 'sleep 1000 & echo $! > "$0"; wait', pidfile }))
        pid = p:pid()
        pid_from(pidfile)
      end
      local gpid = pid_from(pidfile)
      assert.is_false(alive(pid))
      assert.is_true(eventually(function() return not alive(gpid) end, 2))
    end)

    it("kills the process group when the handle is garbage collected", function()
      local pidfile = dir .. "/grandchild"
      local p = assert(proc.spawn({ "/bin/sh", "-c", 'sleep 1000 & echo $! > "$0"; wait', pidfile }))
      local pid = p:pid()
      local gpid = pid_from(pidfile)
      assert.is_true(alive(pid) and alive(gpid))
      p = nil -- luacheck: ignore
      collectgarbage()
      collectgarbage()
      assert.is_false(alive(pid)) -- reaped by the finalizer
      assert.is_true(eventually(function() return not alive(gpid) end, 2))
    end)

    it("wakes a waiting task when the handle is closed", function()
      local p = assert(proc.spawn({ "sleep", "100" }))
      local waiter = rr.spawn(function() return p:wait() end)
      rr.sleep(0.05)
      p:close()
      assert.same({ true, nil, "process handle closed while waiting", "EBADF", n = 4 }, table.pack(rr.wait(waiter)))
    end)

    -- sd-event keeps one child source per PID and refuses another (EBUSY): a handle kept after
    -- its process exited must not make a later spawn fail once the kernel reuses the PID. The
    -- kernel hands PIDs out in a cycle (pid_max: 32768 here, millions elsewhere), too slow to go
    -- round in a spec; a child engine in a PID namespace of its own (and a user namespace, so
    -- that nothing outside it can change) sets that namespace's pid_max to 320 (Linux 6.14 and
    -- later) and goes round in about 320 spawns.
    it("keeps working when a PID of a kept handle is reused", function()
      local script = [[
        local proc = require("rr.proc")
        local f = assert(io.open("/proc/sys/kernel/pid_max", "w"))
        local ok, err = f:write("320")
        if ok then ok, err = f:close() end
        assert(ok, "cannot set this PID namespace's pid_max (needs Linux 6.14 or later): " .. tostring(err))
        -- every PID up to ~311 held by a handle whose process has exited (ten at a time); past
        -- 319 the kernel starts again at 300
        local held = {}
        for _ = 1, 31 do
          local batch = {}
          for i = 1, 10 do batch[i] = assert(proc.spawn({ "true" })) end
          for _, p in ipairs(batch) do
            assert(p:wait())
            held[p:pid()] = p
          end
        end
        for i = 1, 1000 do
          local p, err = proc.spawn({ "true" })
          assert(p, err)
          local pid = p:pid()
          assert(p:wait())
          p:close()
          if held[pid] then
            io.write("PID ", pid, " reused after ", i, " spawns")
            return
          end
        end
        error("no PID was reused in 1000 spawns")
      ]]
      local res, err, _, r = proc.run({ "unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
        require("spec.support.helpers").engine, "-e", script }, { timeout = 60 })
      assert(res, tostring(err) .. " " .. tostring(r and r.stderr))
      assert.matches("^PID %d+ reused after %d+ spawns$", res.stdout)
    end)

    it("fails softly for a program that does not exist", function()
      local p, err, code = proc.spawn({ "/nonexistent/program" })
      assert.is_nil(p)
      assert.equal("cannot run /nonexistent/program: No such file or directory", err)
      assert.equal("ENOENT", code)
    end)
  end)
end)
