-- Specs for hosts: test hosts (spec/support/hosts.lua), the remote manager (rr.systemd.remote:
-- sd-bus over ssh to systemd-stdio-bridge) and rr.remote (commands, rsync, the per-host lock),
-- against real sshd servers and real user managers, one sandbox per host.
--
--   spec/support/run-specs ./rrengine spec/hosts_spec.lua
--
-- Needs the engine as the interpreter, root (sandboxes, sshd) and Debian's openssh-server.
local rr = require("rr")
local proc = require("rr.proc")
local fs = require("rr.fs")
local systemd = require("rr.systemd")
local remote = require("rr.remote")
local hosts = require("spec.support.hosts")
local units = require("spec.support.units")

local ENGINE = os.getenv("RR_ENGINE") or arg[-1]
local UNIT = "rrhost-app.service"

-- Run argv here; its result table, or nil, message, code[, result].
local function run(argv, opts)
  return proc.run(argv, opts or { timeout = 20 })
end

-- What a failed run printed, for assertion messages.
local function said(err, _, r)
  return tostring(err) .. (r and (" " .. r.stderr) or "")
end

-- A property of a unit, read on host h by systemctl through plain ssh (not through our bus).
local function show(h, prop, unit)
  local res, err, code, r = run(hosts.ssh(h, "systemctl --user show --value -p " .. prop .. " " .. unit))
  assert(res, said(err, code, r))
  return (res.stdout:gsub("\n$", ""))
end

describe("hosts", function()
  local hs

  lazy_setup(function()
    hs = hosts.start(3)
    for _, h in ipairs(hs) do
      h:write_unit(UNIT, { exec = { "/bin/sleep", "1000" }, description = "app on " .. h.name })
    end
  end)

  lazy_teardown(function()
    if hs then hosts.stop(hs) end
  end)

  describe("test hosts", function()
    it("run an sshd each, whose sessions reach that host's own manager and state", function()
      for _, h in ipairs({ hs[1], hs[2] }) do
        local res, err, code, r = run(hosts.ssh(h, "printf '%s\\n' \"$RR_TEST_HOST\" \"$XDG_STATE_HOME\";"
          .. " systemctl --user show --value -p Version"))
        assert(res, said(err, code, r))
        local name, state, version = res.stdout:match("^([^\n]*)\n([^\n]*)\n([^\n]*)\n$")
        assert.equal(h.name, name)
        assert.equal(h.env.XDG_STATE_HOME, state)
        assert.matches("^%d+", version)
      end
    end)
  end)

  describe("rr.systemd.remote", function()
    -- The whole life of a unit on host h through its remote manager; returns what it saw.
    local function exercise(h)
      local m <close> = assert(systemd.remote(h.name, { user = true, ssh_config = h.ssh_config }))
      assert.equal(h.name, m:host())
      assert.equal("user", m:scope())
      assert.equal("rr.systemd.manager (user on " .. h.name .. ")", tostring(m))
      assert(m:daemon_reload())
      local u = assert(m:unit(UNIT))
      assert.equal("rr.systemd.unit " .. UNIT .. " (user manager on " .. h.name .. ")", tostring(u))
      assert.equal("app on " .. h.name, u:get("Description"))
      assert(u:start())
      local before = assert(u:properties())
      assert.equal("active", before.ActiveState)
      -- PropertiesChanged through the bridge: the watch sees the restart change the main process
      -- (to none while it stops, or to the new one).
      local watch = rr.spawn(function() return u:wait_change({ "MainPID" }, 20, before) end)
      assert(u:restart())
      local ok, seen, changed = rr.wait(watch)
      assert(ok and seen, tostring(changed))
      assert.same({ "MainPID" }, changed)
      assert.are_not.equal(before.MainPID, seen.MainPID)
      local main_pid = assert(u:get("MainPID"))
      assert.are_not.equal(before.MainPID, main_pid)
      -- The host's own manager, asked without our bus, agrees.
      assert.equal(tostring(main_pid), show(h, "MainPID", UNIT))
      local list = assert(m:list_units(UNIT))
      assert.equal(1, #list)
      assert.equal("active", list[1].active_state)
      -- A state reached through signals, while a job runs on the same connection.
      local stopped = rr.spawn(function() return u:wait_state("inactive", 20) end)
      assert(u:stop())
      local sok, reached, state = rr.wait(stopped)
      assert(sok and reached, tostring(state))
      assert.equal("inactive", state)
      return main_pid
    end

    it("reads properties, runs jobs and waits on two hosts at once, each on its own manager", function()
      local results = rr.wait({ rr.spawn(exercise, hs[1]), rr.spawn(exercise, hs[2]) })
      for i, r in ipairs(results) do
        assert(r[1], "host h" .. i .. ": " .. tostring(r[2]))
        assert.is_true(r[2] > 0)
      end
      -- Two managers, two processes: the jobs did not land on one host.
      assert.are_not.equal(results[1][2], results[2][2])
    end)

    it("refuses m:run, whose program, directory and output pipes are this machine's", function()
      local m <close> = assert(systemd.remote("h1", { user = true, ssh_config = hs[1].ssh_config }))
      local res, err, code = m:run({ "true" })
      assert.is_nil(res)
      assert.equal("EOPNOTSUPP", code)
      assert.matches("^cannot run true on h1: m:run needs a manager on this machine", err)
    end)

    it("takes a bus path literally when given one", function()
      local h = hs[2]
      local m <close> = assert(systemd.remote(h.name, { user = true, ssh_config = h.ssh_config,
        bus_path = "unix:path=" .. h.env.XDG_RUNTIME_DIR .. "/bus" }))
      local u = assert(m:unit(UNIT))
      assert.equal("app on h2", u:get("Description"))
    end)

    it("says why it cannot connect, with the host's name and ssh's or the bridge's reason", function()
      local cfg = hs[1].ssh_config
      local m, err, code = systemd.remote("nosuchhost.invalid", { user = true, ssh_config = cfg })
      assert.is_nil(m)
      assert.equal("EHOSTUNREACH", code)
      assert.matches("^cannot connect to the user manager on nosuchhost%.invalid: ssh: Could not resolve hostname", err)

      m, err, code = systemd.remote("h1", { user = true, ssh_config = cfg, bus_path = "unix:path=/nonexistent/bus" })
      assert.is_nil(m)
      assert.equal("EHOSTUNREACH", code)
      assert.equal("cannot connect to the user manager on h1: Failed to start bus client: No such file or directory", err)

      -- No system bus on these machines (PID 1 is not systemd): the bridge says so.
      m, err, code = systemd.remote("h1", { ssh_config = cfg })
      assert.is_nil(m)
      assert.equal("EHOSTUNREACH", code)
      assert.matches("^cannot connect to the system manager on h1: ", err)
    end)

    it("gives up on a host that never answers at its timeout", function()
      -- A server that accepts and never says a word: ssh waits for its banner.
      local hang <close>, caps = hosts.spawn_until({ units.fixture_bin, "--host", "127.0.0.1", "--port", "0", "--hang" },
        "listening on 127%.0%.0%.1:(%d+)", 10)
      local cfg = hs[1].dir .. "/hang_config"
      assert(fs.write_atomic(cfg, table.concat({ "Host hang", "  HostName 127.0.0.1", "  Port " .. caps[1],
        "  BatchMode yes", "  StrictHostKeyChecking yes", "  UserKnownHostsFile /dev/null", "" }, "\n")))
      local m, err, code = systemd.remote("hang", { user = true, ssh_config = cfg, timeout = 0.5 })
      assert.is_nil(m)
      assert.equal("ETIMEDOUT", code)
      assert.equal("cannot connect to the user manager on hang: no answer within 0.5 s", err)
    end)

    it("refuses a destination ssh could take for an option, and unknown options", function()
      assert.has_error(function() systemd.remote("-oProxyCommand=touch /tmp/x") end)
      assert.has_error(function() systemd.remote("a b") end)
      assert.has_error(function() systemd.remote("") end)
      assert.has_error(function() systemd.remote("h1", { users = true }) end)
      assert.has_error(function() systemd.remote("h1", { bus_path = 1 }) end)
    end)

    it("fails the pending ops of a host that stops answering once ssh gives up on it", function()
      -- The hosts' ssh config gives up after ServerAliveCountMax (3) unanswered probes 2 s apart.
      local h = hs[3]
      local m <close> = assert(systemd.remote(h.name, { user = true, ssh_config = h.ssh_config }))
      local u = assert(m:unit(UNIT))
      local wait = rr.spawn(function() return u:wait_state("failed") end)
      h:freeze()
      local i, ok, v, err, code = rr.race({ function() return rr.wait(wait) end }, 30)
      h:thaw()
      assert(i, tostring(ok))
      assert.is_true(ok)
      assert.is_nil(v)
      assert.matches("^the connection to the user manager on h3 was lost", err)
      assert.equal("ECONNRESET", code)
    end)

    it("fails every pending op of a host that drops, at once and clearly, and the ones after", function()
      local h = hs[3]
      local m <close> = assert(systemd.remote(h.name, { user = true, ssh_config = h.ssh_config }))
      local u = assert(m:unit(UNIT))
      assert(u:start())
      -- A job that never ends on its own (a start that never becomes ready) and a signal wait.
      h:write_unit("rrhost-never.service", { exec = { "/bin/sleep", "1000" }, type = "notify" })
      assert(m:daemon_reload())
      local never = assert(m:unit("rrhost-never.service"))
      local job = rr.spawn(function() return never:start() end)
      local wait = rr.spawn(function() return u:wait_state("failed") end)
      assert(never:wait_state("activating", 20))
      h:kill()
      -- Bounded, so that a hang fails the spec instead of stalling it.
      local i, results = rr.race({ function() return rr.wait({ job, wait }) end }, 20)
      assert(i, tostring(results))
      for _, r in ipairs(results) do
        assert.is_true(r[1])
        assert.is_nil(r[2])
        assert.matches("^the connection to the user manager on h3 was lost", r[3])
        assert.equal("ECONNRESET", r[4])
      end
      local ok, err, code = u:properties()
      assert.is_nil(ok)
      assert.matches("^the connection to the user manager on h3 was lost", err)
      assert.equal("ECONNRESET", code)
      assert.equal("rr.systemd.manager (user on h3, connection lost)", tostring(m))
    end)
  end)

  describe("rr.remote", function()
    local ARGS = { "a b", "  two  spaces ", "it's", "'", "''", "\"dq\"", "$HOME", "${HOME}", "$(id -u)", "`id -u`",
                   "line1\nline2", "\n", "*", "?", "[a]", "~", "~root", "", "--", "-n", "-e", "\\", "\\n", "a;b",
                   "a|b", "a&b", "<x>", "#c", "tab\there", "\r", "é", "%s", "!" }

    it("passes every argument to the host byte for byte", function()
      local argv = { "printf", "%s\\n" }
      for _, a in ipairs(ARGS) do argv[#argv + 1] = a end
      local res, err, code, r = remote.run("h1", argv, { ssh_config = hs[1].ssh_config })
      assert(res, said(err, code, r))
      assert.equal(table.concat(ARGS, "\n") .. "\n", res.stdout)
    end)

    it("runs in a directory and with variables on the host, quoted the same way", function()
      local dir = hs[1].dir .. "/it's a $dir"
      assert(fs.mkdir_p(dir))
      local res, err, code, r = remote.run("h1", { "sh", "-c", "pwd; printf '%s\\n' \"$RR_X\"" },
        { ssh_config = hs[1].ssh_config, cwd = dir, env = { RR_X = "x 'y' $z" } })
      assert(res, said(err, code, r))
      assert.equal(dir .. "\nx 'y' $z\n", res.stdout)
    end)

    it("builds one ssh argv: the config, no terminal, never a prompt, the quoted line after --", function()
      assert.same({ "ssh", "-F", "/c f", "-x", "-T", "-o", "BatchMode=yes", "--", "web1", "exec 'ls' '-l' 'a b'" },
        remote.command("web1", { "ls", "-l", "a b" }, { ssh_config = "/c f" }))
      assert.equal("'it'\\''s'", remote.quote("it's"))
      assert.has_error(function() remote.command("-oProxyCommand=x", { "true" }) end)
      assert.has_error(function() remote.command("h1", {}) end)
      assert.has_error(function() remote.run("h1", { "true" }, { cwdd = "/" }) end)
    end)

    it("says how a remote command failed: its exit code, its timeout (killed on the host too), no host", function()
      local cfg = hs[1].ssh_config
      local res, err, code, r = remote.run("h1", { "sh", "-c", "exit 3" }, { ssh_config = cfg })
      assert.is_nil(res)
      assert.equal("sh on h1 exited with code 3", err)
      assert.equal("EEXIT", code)
      assert.equal(3, r.exit_code)

      local pidfile = hs[1].dir .. "/sleeper.pid"
      res, err, code, r = remote.run("h1", { "sh", "-c", "echo $$ > \"$1\"; exec sleep 1000", "sh", pidfile },
        { ssh_config = cfg, timeout = 0.5 })
      assert.is_nil(res)
      assert.equal("sh on h1 timed out after 0.5 s (killed)", err)
      assert.equal("ETIMEDOUT", code)
      assert.is_true(r.timed_out)
      -- Gone on the host, not only here: ssh ends when the command does.
      local pid = assert(fs.read(pidfile)):match("%d+")
      local gone, gerr, _, gr = remote.run("h1", { "kill", "-0", pid }, { ssh_config = cfg })
      assert.is_nil(gone, "the remote sleep still runs")
      assert.equal(1, gr.exit_code, gerr)

      res, err, code, r = remote.run("nosuchhost.invalid", { "true" }, { ssh_config = cfg })
      assert.is_nil(res)
      assert.matches("^cannot reach nosuchhost%.invalid: ssh: Could not resolve hostname", err)
      assert.equal("EHOSTUNREACH", code)
      assert.is_true(r.unreachable)
    end)

    it("copies with rsync over ssh both ways, whatever the paths and the config's path hold", function()
      local h = hs[1]
      -- rsync splits -e itself: a config path with a space and a quote must survive it.
      local cfg = h.dir .. "/it's a config"
      assert(fs.copy_atomic(h.ssh_config, cfg))
      local src = h.dir .. "/src 'q' $x"
      assert(fs.mkdir_p(src .. "/sub dir"))
      assert(fs.write_atomic(src .. "/sub dir/f'1 $y.txt", "one\n"))
      assert(fs.write_atomic(src .. "/plain", "two\n"))
      local dst = h.dir .. "/dst \"d\" `x` *"
      local res, err, code, r = run(remote.rsync_argv("h1", { "-a" }, src .. "/", dst, { ssh_config = cfg }))
      assert(res, said(err, code, r))
      -- One machine: the host's files are ours to look at.
      assert.equal("one\n", fs.read(dst .. "/sub dir/f'1 $y.txt"))
      assert.equal("two\n", fs.read(dst .. "/plain"))

      local back = h.dir .. "/back"
      res, err, code, r = run(remote.rsync_argv("h1", { "-a" }, dst .. "/", back, { ssh_config = cfg, pull = true }))
      assert(res, said(err, code, r))
      assert.equal("one\n", fs.read(back .. "/sub dir/f'1 $y.txt"))
    end)

    describe("lock", function()
      it("refuses a second locker at once, naming the holder; unlock frees it", function()
        local cfg = hs[2].ssh_config
        local lock <close> = assert(remote.lock("h2", { ssh_config = cfg, user = true, holder = "run A pid=1" }))
        assert.is_true(lock:held())
        assert.equal(hs[2].env.XDG_STATE_HOME .. "/rrengine/run.lock", lock:path())
        assert.equal("run A pid=1\n", fs.read(lock:path()))

        local again, err, code, holder = remote.lock("h2", { ssh_config = cfg, user = true })
        assert.is_nil(again)
        assert.equal("EWOULDBLOCK", code)
        assert.equal("h2 is locked by: run A pid=1", err)
        assert.equal("run A pid=1", holder)

        -- Another host has a lock of its own.
        local other <close> = assert(remote.lock("h1", { ssh_config = hs[1].ssh_config, user = true }))

        assert.is_true(lock:unlock())
        assert.is_false(lock:held())
        local next_one <close> = assert(remote.lock("h2", { ssh_config = cfg, user = true }))
        assert.matches("^host=%S+ pid=" .. fs.getpid() .. " since=", next_one:holder())
      end)

      it("dies with the engine that holds it", function()
        local h = hs[2]
        local script = h.dir .. "/locker.lua"
        -- The child takes both through $RR_SSH_CONFIG, as a plan run with -H would.
        assert(fs.write_atomic(script, [[
          local lock = assert(require("rr.remote").lock(arg[1], { user = true }))
          local m = assert(require("rr.systemd").remote(arg[1], { user = true }))
          print("locked by " .. require("rr.fs").getpid() .. " " .. m:host())
          require("rr").sleep(600)
        ]]))
        local child, caps = hosts.spawn_until({ ENGINE, script, h.name }, "^locked by (%d+) h2$", 20,
          { env = { RR_SSH_CONFIG = h.ssh_config } })
        local pid = caps[1]

        local lock, err, code = remote.lock("h2", { ssh_config = h.ssh_config, user = true })
        assert.is_nil(lock)
        assert.equal("EWOULDBLOCK", code)
        assert.matches("^h2 is locked by: host=%S+ pid=" .. pid .. " since=", err)

        child:kill("KILL")
        child:wait()
        child:close()
        -- Freed without anyone unlocking it: flock waits for the kernel to release it.
        local freed <close>, ferr = remote.lock("h2", { ssh_config = h.ssh_config, user = true, wait = 20 })
        assert(freed, ferr)
      end)

      it("says why a lock file cannot be had", function()
        local lock, err, code = remote.lock("h1", { ssh_config = hs[1].ssh_config, path = "/proc/nope/run.lock" })
        assert.is_nil(lock)
        assert.equal("ENOENT", code)
        assert.matches("^cannot lock h1: .*/proc/nope", err)

        lock, err, code = remote.lock("nosuchhost.invalid", { ssh_config = hs[1].ssh_config })
        assert.is_nil(lock)
        assert.equal("EHOSTUNREACH", code)
        assert.matches("^cannot lock nosuchhost%.invalid: cannot reach", err)
      end)
    end)
  end)
end)
