-- Commands run as transient units (rr.systemd's m:run, engine/systemd-run.c) against the
-- sandboxed real user manager: exit codes and signals, output line by line, cwd and env, and
-- the reason it exists: a command whose child leaves its process group (setsid) is ended with
-- everything it started, at its timeout, when its task is cancelled, and when it exits on its
-- own. Then the flow's migrations and the deploy's rsync, which run so.
local rr = require("rr")
local fs = require("rr.fs")
local proc = require("rr.proc")
local systemd = require("rr.systemd")
local deploy = require("rr.deploy")
local helpers = require("spec.support.helpers")
local platform = require("spec.support.platform")

-- "R", "S", ... from /proc/PID/stat, and the session; nil when there is no such process.
local function stat(pid)
  local text = fs.read(("/proc/%d/stat"):format(pid))
  if not text then return nil end
  local state, sid = text:match("%) (%a) %-?%d+ %-?%d+ (%-?%d+)")
  return state, tonumber(sid)
end

-- Does the process still run (a zombie has ended: only its parent has not reaped it yet)?
local function alive(pid)
  local state = stat(pid)
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- ActiveState of a unit by name; a collected transient unit loads as a not-found stub.
local function unit_state(m, name)
  local u = assert(m:unit(name))
  local props = assert(u:properties())
  return props.ActiveState, props.LoadState
end

-- Every line a run delivers: { {stream, line}, ... }, and on_line itself.
local function collector()
  local lines = {}
  return lines, function(stream, line) lines[#lines + 1] = { stream, line } end
end

-- The lines of one stream, in the order they came.
local function of(lines, stream)
  local out = {}
  for _, l in ipairs(lines) do if l[1] == stream then out[#out + 1] = l[2] end end
  return out
end

describe("m:run", function()
  local m, dir

  setup(function()
    m = assert(systemd.user())
    dir = assert(fs.mkdtemp("/tmp/rr-transient-"))
  end)
  teardown(function()
    fs.remove_tree(dir)
    m:close()
  end)

  it("runs argv as a transient unit: its output, its exit code 0, the unit and the main PID", function()
    local started
    local res = assert(m:run({ "sh", "-c", "echo hello; echo oops >&2" },
      { on_start = function(unit, pid) started = { unit, pid } end }))
    assert.equal(0, res.exit_code)
    assert.is_nil(res.signal)
    assert.is_false(res.timed_out)
    assert.equal("hello\n", res.stdout)
    assert.equal("oops\n", res.stderr)
    assert.same({ stdout = false, stderr = false }, res.truncated)
    assert.matches("^rrengine%-run%-%x+%.service$", res.unit)
    assert.equal("integer", math.type(res.pid))
    assert.same({ res.unit, res.pid }, started)
    assert.equal("number", type(res.duration))
    -- collected once it ended: nothing is left in the manager
    local state, load = unit_state(m, res.unit)
    assert.equal("inactive", state)
    assert.equal("not-found", load)
  end)

  it("delivers every line in order with its stream's name, the last one without its newline too", function()
    local lines, on_line = collector()
    local res = assert(m:run({ "sh", "-c",
      "i=1; while [ $i -le 300 ]; do echo out$i; [ $((i % 3)) = 0 ] && echo err$i >&2; i=$((i+1)); done; printf tail" },
      { on_line = on_line }))
    local want_out, want_err = {}, {}
    for i = 1, 300 do
      want_out[#want_out + 1] = "out" .. i
      if i % 3 == 0 then want_err[#want_err + 1] = "err" .. i end
    end
    want_out[#want_out + 1] = "tail"
    assert.same(want_out, of(lines, "stdout"))
    assert.same(want_err, of(lines, "stderr"))
    assert.equal(#want_out + #want_err, #lines)
    assert.equal(table.concat(want_out, "\n"), res.stdout)
  end)

  it("a non-zero exit: nil, message, EEXIT, res", function()
    local res, err, code, r = m:run({ "sh", "-c", "echo before >&2; exit 3" })
    assert.is_nil(res)
    assert.equal("sh exited with code 3", err)
    assert.equal("EEXIT", code)
    assert.equal(3, r.exit_code)
    assert.equal("before\n", r.stderr)
    assert.equal("exit-code", r.result)
  end)

  it("a program that exits at once ran: its exit code, and on_start, even when it beat its start job", function()
    -- Type=exec: the start job ends once the program runs; one that exits first fails the job
    -- (a race systemd decides each time), having run all the same
    for _ = 1, 20 do
      local started = false
      local res, err, code, r = m:run({ "sh", "-c", "exit 3" }, { on_start = function() started = true end })
      assert.is_nil(res)
      assert.equal("EEXIT", code, err)
      assert.equal(3, r.exit_code)
      assert.is_true(started)
    end
  end)

  it("killed by a signal: nil, message, ESIGNAL, res", function()
    local res, err, code, r = m:run({ "sh", "-c", "kill -KILL $$" })
    assert.is_nil(res)
    assert.equal("sh killed by SIGKILL", err)
    assert.equal("ESIGNAL", code)
    assert.equal("SIGKILL", r.signal)
    assert.is_nil(r.exit_code)
    assert.is_false(r.timed_out)
  end)

  it("passes argv as given: neither a shell nor systemd's $VAR expansion touches it", function()
    local res = assert(m:run({ "printf", "%s|", "$HOME", "${HOME}", "$$", "a b", "$(touch x)", "%n", "" }))
    assert.equal("$HOME|${HOME}|$$|a b|$(touch x)|%n||", res.stdout)
  end)

  it("runs in cwd (the engine's own by default)", function()
    local res = assert(m:run({ "pwd" }, { cwd = dir }))
    assert.equal(fs.realpath(dir) .. "\n", res.stdout)
    res = assert(m:run({ "pwd" }))
    assert.equal(fs.realpath(".") .. "\n", res.stdout)
    -- a relative program is found in cwd, as execvp does
    helpers.write(dir .. "/bin/hello", "#!/bin/sh\necho hi from $0\n", helpers.mode("755"))
    res = assert(m:run({ "bin/hello" }, { cwd = dir }))
    assert.equal("hi from " .. fs.realpath(dir) .. "/bin/hello\n", res.stdout)
  end)

  it("gets the engine's environment merged with env (a unit inherits nothing of the engine's)", function()
    -- the sandbox's manager started with a clean environment: only the engine has this
    local mine = assert(os.getenv("RR_SANDBOX_DIR"))
    local script = "echo ${RR_SANDBOX_DIR-unset}; echo ${FOO-unset}; echo ${N-unset}"
    local res = assert(m:run({ "sh", "-c", script }))
    assert.equal(mine .. "\nunset\nunset\n", res.stdout)
    res = assert(m:run({ "sh", "-c", script }, { env = { FOO = "bar baz", N = 42, RR_SANDBOX_DIR = false } }))
    assert.equal("unset\nbar baz\n42\n", res.stdout)
    -- env.PATH is where the program is looked up, and what it gets
    helpers.write(dir .. "/path/only-here", "#!/bin/sh\necho found; echo $PATH\n", helpers.mode("755"))
    res = assert(m:run({ "only-here" }, { env = { PATH = dir .. "/path:/usr/bin:/bin" } }))
    assert.equal("found\n" .. dir .. "/path:/usr/bin:/bin\n", res.stdout)
  end)

  it("keeps the engine's umask", function()
    local via_proc = assert(proc.run({ "sh", "-c", "umask" })).stdout
    assert.equal(via_proc, assert(m:run({ "sh", "-c", "umask" })).stdout)
  end)

  it("names its unit after name_prefix", function()
    local res = assert(m:run({ "true" }, { name_prefix = "rrtest-migration-sso.api" }))
    assert.matches("^rrtest%-migration%-sso%.api%-%x+%.service$", res.unit)
  end)

  it("keeps at most max_capture bytes of each stream, or none", function()
    local res = assert(m:run({ "sh", "-c", "printf 0123456789abcdef" }, { max_capture = 10 }))
    assert.equal("0123456789", res.stdout)
    assert.is_true(res.truncated.stdout)
    local lines, on_line = collector()
    res = assert(m:run({ "sh", "-c", "echo a; echo b >&2" }, { capture = false, on_line = on_line }))
    assert.equal("", res.stdout)
    assert.equal("", res.stderr)
    assert.equal(2, #lines)
  end)

  it("says why a command cannot start, and starts nothing", function()
    local res, err, code = m:run({ "no-such-program-here" })
    assert.is_nil(res)
    assert.equal("cannot run no-such-program-here: No such file or directory", err)
    assert.equal("ENOENT", code)
    helpers.write(dir .. "/not-exec", "#!/bin/sh\n", helpers.mode("644"))
    res, err, code = m:run({ dir .. "/not-exec" })
    assert.is_nil(res)
    assert.equal("EACCES", code, err)
    res, err, code = m:run({ "true" }, { cwd = dir .. "/missing" })
    assert.is_nil(res)
    assert.equal(("cannot run true in %s/missing: No such file or directory"):format(dir), err)
    assert.equal("ENOENT", code)
    res, err, code = m:run({ "true" }, { cwd = dir .. "/not-exec" })
    assert.equal("ENOTDIR", code, err)
  end)

  it("says when the manager refuses the unit", function()
    -- systemd takes no environment assignment longer than ARG_MAX
    local res, err, code = m:run({ "true" }, { env = { BIG = string.rep("x", 4 * 1024 * 1024) } })
    assert.is_nil(res)
    assert.matches("^cannot run true: ", err)
    assert.equal("EINVAL", code)
  end)

  it("says when the program cannot start after all: the unit's start job failed", function()
    -- executable by its mode, but not a program: execve() fails in the unit (systemd's 203/EXEC)
    helpers.write(dir .. "/junk", "\0\1\2\3 not a program\n", helpers.mode("755"))
    local started = false
    local res, err, code = m:run({ dir .. "/junk" }, { on_start = function() started = true end })
    assert.is_nil(res)
    assert.matches("^cannot run " .. dir:gsub("%p", "%%%0") .. "/junk: its unit rrengine%-run%-%x+%.service failed to start", err)
    assert.matches("exit status 203", err)
    assert.equal("ENOEXEC", code)
    assert.is_false(started)
  end)

  it("raises on misuse", function()
    assert.has_error(function() m:run({}) end)
    assert.has_error(function() m:run("true") end)
    assert.has_error(function() m:run({ "true" }, { tiemout = 1 }) end)
    assert.has_error(function() m:run({ "true" }, { timeout = 0 }) end)
    assert.has_error(function() m:run({ "true" }, { env = { ["A-B"] = "x" } }) end)
    assert.has_error(function() m:run({ "true" }, { env = { A = {} } }) end)
    assert.has_error(function() m:run({ "true" }, { on_line = "print" }) end)
    assert.has_error(function() m:run({ "true" }, { name_prefix = "bad/prefix" }) end)
    assert.has_error(function() m:run({ "true", "\255" }) end)
  end)

  describe("a child that leaves its process group", function()
    -- The child starts its own session (setsid), says its PID, and sleeps for ever; so does the
    -- main process. A process-group kill never reaches the child.
    local ESCAPE = "setsid sh -c 'echo child $$; exec sleep 1000' & echo main $$; exec sleep 1000"

    -- on_line that records the child's and main PIDs (and their sessions, while they run).
    local function watcher()
      local seen = {}
      return seen, function(_, line)
        local who, pid = line:match("^(%a+) (%d+)$")
        if who then
          pid = tonumber(pid)
          seen[who] = pid
          seen[who .. "_sid"] = select(2, stat(pid))
        end
      end
    end

    it("(rr.proc, for comparison: its timeout kills the group, and the child lives on)", function()
      local seen, on_line = watcher()
      local res, err = proc.run({ "sh", "-c", ESCAPE }, { timeout = 0.5, kill_grace = 0.5, on_line = on_line })
      assert.is_nil(res)
      assert.matches("timed out", err)
      assert.is_truthy(seen.child, "the child never said its PID")
      local survived = alive(seen.child)
      if survived then os.execute(("kill -KILL %d"):format(seen.child)) end -- started here: ours to end
      assert.is_true(survived, "rr.proc killed the setsid child: this spec no longer shows why m:run exists")
    end)

    it("is gone, with everything else the command started, after the timeout", function()
      local seen, on_line = watcher()
      local res, err, code, r = m:run({ "sh", "-c", ESCAPE }, { timeout = 0.5, kill_grace = 1, on_line = on_line })
      assert.is_nil(res)
      assert.equal("sh timed out after 0.5 s (killed)", err)
      assert.equal("ETIMEDOUT", code)
      assert.is_true(r.timed_out)
      assert.equal("SIGTERM", r.signal)
      -- it did leave: a session of its own
      assert.is_truthy(seen.child, "the child never said its PID")
      assert.equal(seen.child, seen.child_sid)
      assert.are_not.equal(seen.main_sid, seen.child_sid)
      assert.is_false(alive(seen.child), "the setsid child outlived the timeout")
      assert.is_false(alive(seen.main))
      assert.equal(seen.main, r.pid)
      assert.equal("inactive", (unit_state(m, r.unit)))
    end)

    it("is ended at the timeout even when it ignores SIGTERM: SIGKILL after kill_grace", function()
      local seen, on_line = watcher()
      local res, err, code, r = m:run({ "sh", "-c",
        "setsid sh -c 'trap \"\" TERM; echo child $$; while :; do sleep 1; done' & trap '' TERM; echo main $$; while :; do sleep 1; done" },
        { timeout = 0.5, kill_grace = 0.5, on_line = on_line })
      assert.is_nil(res)
      assert.equal("ETIMEDOUT", code, err)
      assert.equal("SIGKILL", r.signal)
      assert.is_false(alive(seen.child))
      assert.is_false(alive(seen.main))
    end)

    it("goes with the command when the command ends on its own", function()
      local seen, on_line = watcher()
      local fifo = dir .. "/ready.fifo"
      helpers.run({ "mkfifo", fifo })
      -- the main process waits (on the FIFO) until the child runs, then exits 0
      local res = assert(m:run({ "sh", "-c",
        ("setsid sh -c 'echo child $$; echo > %s; exec sleep 1000' & read x < %s; echo done"):format(fifo, fifo) },
        { on_line = on_line }))
      os.remove(fifo)
      assert.equal(0, res.exit_code)
      assert.is_truthy(seen.child)
      assert.is_false(alive(seen.child), "the setsid child outlived its command")
    end)

    it("is stopped, with its unit, when the calling task is cancelled", function()
      local unit, runner
      local seen = {}
      runner = rr.spawn(function()
        return m:run({ "sh", "-c", ESCAPE }, {
          on_start = function(name) unit = name end,
          on_line = function(_, line)
            local who, pid = line:match("^(%a+) (%d+)$")
            if who then seen[who] = tonumber(pid) end
            if seen.child and seen.main then runner:cancel() end -- both run: now
          end,
        })
      end)
      local ok, err = rr.wait(runner)
      assert.is_false(ok)
      assert.matches("canceled", tostring(err))
      assert.is_truthy(unit)
      -- the stop went out as the task ended; the unit ends, and its cgroup with it
      local u = assert(m:unit(unit))
      assert(u:wait_state({ "inactive", "failed" }, 30))
      assert.is_false(alive(seen.child), "the setsid child outlived the cancelled run")
      assert.is_false(alive(seen.main))
    end)
  end)

  it("calls on_start before the first line, even for a program that writes as soon as it runs", function()
    -- the first line is in the pipe before the manager's JobRemoved (what on_start waits for)
    -- reaches the engine; many runs make that race show
    for i = 1, 25 do
      local order = {}
      assert(m:run({ "sh", "-c", "echo first; echo second" }, {
        on_start = function() order[#order + 1] = "start" end,
        on_line = function(_, line) order[#order + 1] = line end,
      }))
      assert.same({ "start", "first", "second" }, order, "run " .. i)
    end
  end)

  it("is not disturbed by a daemon-reload while it runs", function()
    local fifo = dir .. "/go.fifo"
    helpers.run({ "mkfifo", fifo })
    local res = assert(m:run({ "sh", "-c", "read line < " .. fifo .. "; echo got $line" }, {
      on_start = function()
        assert(m:daemon_reload())
        local f = assert(io.open(fifo, "w")) -- the command reads it: it still runs, reloaded
        f:write("after-reload\n")
        f:close()
      end,
    }))
    os.remove(fifo)
    assert.equal("got after-reload\n", res.stdout)
  end)
end)

describe("the flow's migration as a transient unit", function()
  local p, release

  setup(function()
    p = platform.new({
      { name = "api", http = true, code = true, migrate_timeout = 1,
        -- the migration's child leaves its process group and says where it runs; the
        -- migration itself hangs
        migrate = { "sh", "-c", "setsid sh -c 'echo $$ > ../child.pid; exec sleep 1000' & echo migrating; exec sleep 1000" } },
    })
    p:start()
    release = p.dir .. "/release"
    helpers.write(release .. "/version", "v2\n")
    helpers.write(release .. "/app.lua", "return 'new code'\n")
  end)
  teardown(function() p:teardown() end)

  it("is killed at migrate_timeout with everything it started, and the flow fails cleanly with the deploy undone", function()
    local wd = p.by_name.api.working_dir
    local before_version, before_app = fs.read(wd .. "/version"), fs.read(wd .. "/app.lua")
    local pid = p:props("api").MainPID
    local summary = p:run({ deploy = true, deploy_path = release })
    assert.equal(1, summary.exit_code)
    local failed = p:last_event("SERVICE_RESTART_FAILED", "api")
    assert.matches("migration failed: sh timed out after 1 s", failed.error)
    assert.is_truthy(p:last_event("MIGRATION_OUTPUT", "api"))
    assert.equal("migrating", p:last_event("MIGRATION_OUTPUT", "api").line)
    -- the deploy is undone, the service was never restarted
    assert.is_truthy(p:last_event("DEPLOY_UNDONE", "api"))
    assert.equal(before_version, fs.read(wd .. "/version"))
    assert.equal(before_app, fs.read(wd .. "/app.lua"))
    assert.equal(pid, p:props("api").MainPID)
    assert.equal("active", p:props("api").ActiveState)
    -- and nothing of the migration runs on
    local child = tonumber((assert(fs.read(p.dir .. "/code/child.pid"), "the migration's child never ran")))
    assert.is_false(alive(child), "the migration's setsid child outlived migrate_timeout")
  end)
end)

describe("the deploy's rsync as a transient unit", function()
  local root, m

  setup(function()
    m = assert(systemd.user())
  end)
  before_each(function()
    root = assert(fs.mkdtemp("/tmp/rr-transient-deploy."))
    helpers.write(root .. "/work/app.js", "v1\n")
    helpers.write(root .. "/src/app.js", "v2 longer\n")
    helpers.write(root .. "/src/lib/new.js", "new\n")
  end)
  after_each(function() fs.remove_tree(root) end)
  teardown(function() m:close() end)

  it("runs rsync in a unit when given a manager, tells on_spawn its PID and unit, and undoes as before", function()
    local spawned, ended
    local record = assert(deploy.apply{ source = root .. "/src", target = root .. "/work",
      state_dir = root .. "/state", manager = m,
      on_spawn = function(pid, what)
        spawned = { pid = pid, what = what }
        return function() ended = true end
      end })
    assert.equal("applied", record.state)
    assert.equal("v2 longer\n", fs.read(root .. "/work/app.js"))
    assert.same({ "lib/new.js" }, record.created)
    assert.same({ "app.js" }, record.replaced)
    assert.equal("integer", math.type(spawned.pid))
    assert.matches("^rsync .* as unit rrengine%-rsync%-%x+%.service$", spawned.what)
    assert.is_true(ended)
    assert(deploy.undo(record))
    assert.equal("v1\n", fs.read(root .. "/work/app.js"))
    assert.is_nil(fs.stat(root .. "/work/lib/new.js"))
  end)
end)
