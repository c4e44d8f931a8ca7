-- Specs for the status of a platform spread over several hosts: plans/status.lua and the REPL's
-- status() and health(name), against two test hosts (real sshd, real user managers:
-- spec/support/hosts.lua) and this sandbox's own user manager for the local service.
--
--   spec/support/run-specs ./rrengine spec/hosts_status_spec.lua
local proc = require("rr.proc")
local fs = require("rr.fs")
local systemd = require("rr.systemd")
local cjson = require("cjson")
local hosts = require("spec.support.hosts")
local units = require("spec.support.units")
local helpers = require("spec.support.helpers")

local SLEEP = { exec = { "/bin/sleep", "1000" } }

describe("status across hosts", function()
  local hs, dir, file, cfg, here

  -- Runs the engine with args (the services file and --user given); the result table.
  local function engine(args, env, stdin)
    local argv = { helpers.engine }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    -- bounded: a hang fails the spec instead of stalling it
    local res, _, _, r = proc.run(argv, { timeout = 40, cwd = units.root, env = env, stdin = stdin })
    local out = res or r
    assert(out and not out.timed_out, "the engine did not finish within 40 s")
    return out
  end

  local function status_plan(extra)
    local args = { "plans/status.lua", "--user", "--services", file, "--ssh-config", cfg }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    return engine(args)
  end

  -- The rows of status.lua --json, by service name, and their order.
  local function json_rows(res)
    local rows = cjson.decode(res.stdout)
    local by, order = {}, {}
    for i, r in ipairs(rows) do
      by[r.name] = r
      order[i] = r.name
    end
    return by, order
  end

  lazy_setup(function()
    hs = hosts.start(2)
    cfg = hs[1].ssh_config
    dir = assert(fs.mkdtemp("/tmp/rr-hosts-status-"))
    for _, h in ipairs(hs) do
      h:write_unit("rrhs-a.service", SLEEP)
      h:write_unit("rrhs-b.service", SLEEP)
      local m <close> = assert(systemd.remote(h.name, { user = true, ssh_config = cfg }))
      assert(m:daemon_reload())
      -- a runs on both hosts, b only on h2: the states shown are each host's own
      assert((assert(m:unit("rrhs-a.service"))):start())
      if h.name == "h2" then assert((assert(m:unit("rrhs-b.service"))):start()) end
    end
    units.write("rrhs-here.service", SLEEP)
    here = assert(systemd.user())
    assert(here:daemon_reload())
    assert((assert(here:unit("rrhs-here.service"))):start())
    -- declared interleaved: the rows come grouped by host all the same
    file = helpers.write(dir .. "/services.lua", [[
      return {
        host = "h1",
        services = {
          { name = "a1", unit = "rrhs-a.service" },
          { name = "a2", unit = "rrhs-a.service", host = "h2" },
          { name = "here", unit = "rrhs-here.service", host = false },
          { name = "b1", unit = "rrhs-b.service" },
          { name = "b2", unit = "rrhs-b.service", host = "h2" },
        },
      }]])
  end)

  lazy_teardown(function()
    if here then
      local u = here:unit("rrhs-here.service")
      if u then u:stop() end
      here:close()
      units.remove("rrhs-here.service")
    end
    if hs then hosts.stop(hs) end
    if dir then fs.remove_tree(dir) end
  end)

  it("shows every service on every host with its real state, grouped by host, this machine first", function()
    local res = status_plan()
    -- b1 is inactive on h1: not all healthy
    assert.equal(1, res.exit_code, res.stderr)
    local lines = {}
    for line in res.stdout:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.matches("^HOST +SERVICE +UNIT +STATE", lines[1])
    local expect = { { "local", "here", "active" }, { "h1", "a1", "active" }, { "h1", "b1", "inactive" },
                     { "h2", "a2", "active" }, { "h2", "b2", "active" } }
    for i, e in ipairs(expect) do
      local host, name, _, state = lines[i + 1]:match("^(%S+) +(%S+) +(%S+) +(%S+)")
      assert.same(e, { host, name, state }, lines[i + 1])
    end
    assert.equal(#expect + 1, #lines, res.stdout)

    local by, order = json_rows(status_plan({ "--json" }))
    assert.same({ "here", "a1", "b1", "a2", "b2" }, order)
    assert.equal("h1", by.a1.host)
    assert.equal("h2", by.b2.host)
    assert.is_nil(by.here.host)
    assert.equal("healthy", by.a2.health)
    assert.equal("unhealthy", by.b1.health)
    -- each host's own process: a1 and a2 are one unit name on two managers
    assert.is_true(by.a1.pid > 0 and by.a2.pid > 0)
    assert.are_not.equal(by.a1.pid, by.a2.pid)
  end)

  it("-H HOST shows only that host's services; a host the file does not name is refused", function()
    local res = status_plan({ "-H", "h2" })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    local names = {}
    for host, name in res.stdout:gmatch("\n(%S+) +(%S+)") do names[#names + 1] = host .. " " .. name end
    assert.same({ "h2 a2", "h2 b2" }, names)

    local by, order = json_rows(status_plan({ "--host", "h1", "--json" }))
    assert.same({ "a1", "b1" }, order)
    assert.equal("inactive", by.b1.active)

    res = status_plan({ "-H", "h3" })
    assert.equal(2, res.exit_code)
    assert.equal(("rrengine: no service of %s is on host h3 (its hosts: local, h1, h2)\n"):format(file), res.stderr)
    res = status_plan({ "--host=-oProxyCommand=x" })
    assert.equal(2, res.exit_code)
    assert.matches("^rrengine: option %-%-host \"%-oProxyCommand=x\": must not start with \"%-\"", res.stderr)
  end)

  it("the REPL's status() and health(name) reach each service's host", function()
    local res = engine({ "-i", "--user", "--services", file }, { RR_SSH_CONFIG = cfg },
      'status()\nprint("H", health("a2"))\nprint("H", health("b1"))\n')
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("\nh1 +b1 +rrhs%-b%.service +inactive", res.stdout)
    assert.matches("\nh2 +b2 +rrhs%-b%.service +active", res.stdout)
    assert.matches("\nlocal +here +rrhs%-here%.service +active", res.stdout)
    assert.matches("\nH\thealthy\t", res.stdout)
    assert.matches("\nH\tunhealthy\t", res.stdout)
  end)

  it("a host that drops: its rows say it cannot be reached, the others are shown, exit 1", function()
    hs[2]:kill()
    local res = status_plan()
    assert.equal(1, res.exit_code, res.stderr)
    assert.matches("\nh1 +a1 +rrhs%-a%.service +active", res.stdout)
    assert.matches("\nlocal +here +rrhs%-here%.service +active", res.stdout)
    for _, name in ipairs({ "a2", "b2" }) do
      assert.matches("\nh2 +" .. name .. " +rrhs%-.%.service +%? +%? +%- +unknown %(host h2 unreachable: cannot "
        .. "connect to the user manager on h2: ", res.stdout)
    end
    local by = json_rows(status_plan({ "--json" }))
    assert.is_true(by.a2.unreachable)
    assert.equal("unknown", by.b2.health)
    assert.is_nil(by.a1.unreachable)

    res = engine({ "-i", "--user", "--services", file }, { RR_SSH_CONFIG = cfg }, 'print("H", health("a2"))\n')
    assert.matches("\nH\tunhealthy\thost h2 unreachable: cannot connect to the user manager on h2: ", res.stdout)
  end)
end)
