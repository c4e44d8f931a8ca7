-- Specs for hosts: test hosts (spec/support/hosts.lua) and the remote manager (rr.systemd.remote:
-- sd-bus over ssh to systemd-stdio-bridge),
-- against real sshd servers and real user managers, one sandbox per host.
--
--   spec/support/run-specs ./rrengine spec/hosts_spec.lua
--
-- Needs the engine as the interpreter, root (sandboxes, sshd) and Debian's openssh-server.
local rr = require("rr")
local proc = require("rr.proc")
local fs = require("rr.fs")
local systemd = require("rr.systemd")
local hosts = require("spec.support.hosts")
local units = require("spec.support.units")

local ENGINE = os.getenv("RR_ENGINE") or arg[-1]
local UNIT = "rrhost-app.service"

-- Run argv here; its result table, or nil, message, result.
local function run(argv, opts)
  return proc.run(argv, opts or { timeout = 20 })
end

-- What a failed run printed, for assertion messages.
local function said(err, r)
  return tostring(err) .. (type(r) == "table" and (" " .. r.stderr) or "")
end

-- A property of a unit, read on host h by systemctl through plain ssh (not through our bus).
local function show(h, prop, unit)
  local res, err, r = run(hosts.ssh(h, "systemctl --user show --value -p " .. prop .. " " .. unit))
  assert(res, said(err, r))
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
        local res, err, r = run(hosts.ssh(h, "printf '%s\\n' \"$RR_TEST_HOST\" \"$XDG_STATE_HOME\";"
          .. " systemctl --user show --value -p Version"))
        assert(res, said(err, r))
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
end)
