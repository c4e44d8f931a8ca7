-- Every acting entry point on a remote host: plans/rollback.lua, the dry run, the REPL's
-- restart() and rollback(), a migration of a killed run still running there, and what
-- plans/status.lua says about a host's run journal. Child engines against real sshd servers and
-- real user managers (spec/support/hosts.lua).
--
--   spec/support/run-specs ./rrengine spec/hosts_ops_spec.lua
local proc = require("rr.proc")
local fs = require("rr.fs")
local cjson = require("cjson")
local systemd = require("rr.systemd")
local remote = require("rr.remote")
local journal = require("rr.journal")
local hosts = require("spec.support.hosts")
local units = require("spec.support.units")
local helpers = require("spec.support.helpers")

-- A oneshot that stays active and fails to start when its working dir's version says "bad".
local function checked_unit(wd)
  return { exec = { "/bin/sh", "-c", ('test "$(cat %s/version)" != bad'):format(wd) }, type = "oneshot",
    extra_service = { RemainAfterExit = "yes" } }
end

describe("acting on a remote host", function()
  local hs, h, dir, cfg, file, wd, release, release2, unit_path, state_root

  local function child(plan, args, opts)
    local argv = { helpers.engine, plan, "--user", "--services", file, "--ssh-config", cfg }
    if plan ~= "plans/status.lua" then
      argv[#argv + 1] = "--events"; argv[#argv + 1] = dir .. "/events.jsonl"
    end
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    local o = { timeout = 120, cwd = units.root, capture = true }
    for k, v in pairs(opts or {}) do o[k] = v end
    local res, _, _, r = proc.run(argv, o)
    local out = res or r
    assert(out and not out.timed_out, plan .. " did not finish within 120 s")
    return out
  end
  local function rolling(args, opts) return child("plans/rolling.lua", args, opts) end

  local function show(prop)
    local res = assert(proc.run(hosts.ssh(h, "systemctl --user show --value -p " .. prop .. " rrho-api.service")))
    return (res.stdout:gsub("\n$", ""))
  end

  -- sha256 of every file below d, read on the host over ssh
  local function tree(d)
    local res = assert(proc.run(hosts.ssh(h, "cd " .. d .. " && find . -type f -print0 | sort -z | xargs -0 sha256sum")))
    return res.stdout
  end

  -- Every file under the host's state root with its size and mtime: what "touches nothing" compares.
  local function state_listing()
    local res = assert(proc.run({ "sh", "-c", 'cd "$0" && find . -printf "%p %s %T@\\n" | sort', state_root }))
    return res.stdout
  end

  local function services_file(extra_api)
    helpers.write(file, ([[return {
  defaults = { stabilize = 0, health = { timeout = 20 } },
  services = {
    { name = "api", unit = "rrho-api.service", host = "h1", working_dir = %q %s },
  },
}
]]):format(wd, extra_api or ""))
  end

  -- The journal on the host, as the engine left it (the spec reads the host's directory directly).
  local function host_journal()
    return journal.read(state_root)
  end

  -- Waits, through the host's manager, until a transient unit has ended (signals, not a poll).
  local function wait_gone(unit)
    local m <close> = assert(systemd.remote(h.name, { user = true, ssh_config = cfg }))
    local u = m:unit(unit)
    if u then assert(u:wait_state({ "inactive", "failed" }, 60)) end
  end

  lazy_setup(function()
    hs = hosts.start(1)
    h = hs[1]
    cfg = h.ssh_config
    dir = assert(fs.mkdtemp("/tmp/rr-hosts-ops-"))
    file = dir .. "/services.lua"
    wd = h.dir .. "/app"
    release, release2 = dir .. "/release", dir .. "/release2"
    state_root = h.env.XDG_STATE_HOME .. "/rrengine"
    helpers.write(wd .. "/version", "good\n")
    helpers.write(wd .. "/keep.txt", "kept\n")
    helpers.write(release .. "/version", "good2\n")
    helpers.write(release .. "/new.txt", "new\n")
    helpers.write(release2 .. "/version", "good3\n")
    helpers.write(release2 .. "/keep.txt", "replaced\n")
    h:write_unit("rrho-api.service", checked_unit(wd))
    unit_path = h.unit_dir .. "/rrho-api.service"
    local m <close> = assert(systemd.remote(h.name, { user = true, ssh_config = cfg }))
    assert(m:daemon_reload())
    assert(assert(m:unit("rrho-api.service")):start())
    services_file()
    -- a first run: the definition on disk becomes the known good one, on h1
    local res = rolling({})
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.is_true(fs.exists(state_root .. "/snapshots/api/current"))
  end)

  lazy_teardown(function()
    if hs then hosts.stop(hs) end
    if dir then fs.remove_tree(dir) end
  end)

  it("plans/rollback.lua rolls a remote service back on its host: unit file and code byte-identical", function()
    local unit_before, tree_before = fs.sha256(unit_path), tree(wd)
    local res = rolling({ "--service", "api", "--deploy", "--deploy-path", release })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.equal("good2\n", fs.read(wd .. "/version"))
    -- an operator's edit on the host, not loaded yet
    helpers.edit(unit_path, "%[Service%]", "[Service]\nEnvironment=EDITED=1")
    assert.are_not.equal(unit_before, fs.sha256(unit_path))

    res = child("plans/rollback.lua", { "--service", "api" })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.equal(unit_before, fs.sha256(unit_path))
    assert.equal(tree_before, tree(wd))
    assert.equal("active", show("ActiveState"))
    assert.equal("no", show("NeedDaemonReload"))
    -- its records on the host say so: the deploy undone, no pointer, no journal left
    assert.is_false(fs.exists(state_root .. "/deploys/api.last"))
    assert.is_false(fs.exists(state_root .. "/run.journal"))
    local undone = false
    for line in (fs.read(dir .. "/events.jsonl") or ""):gmatch("[^\n]+") do
      if line:find('"DEPLOY_UNDONE"', 1, true) then undone = true end
    end
    assert.is_true(undone)
  end)

  it("plans/rollback.lua on a remote service: refused while another run holds that host's lock", function()
    local lock <close> = assert(remote.lock("h1", { ssh_config = cfg, holder = "host=spec pid=4242",
      path = state_root .. "/run.lock" }))
    local before = fs.sha256(unit_path)
    helpers.edit(unit_path, "%[Service%]", "[Service]\nEnvironment=EDITED=2")
    local edited = fs.sha256(unit_path)
    local res = child("plans/rollback.lua", { "--service", "api" })
    assert.equal(1, res.exit_code, res.stdout .. res.stderr)
    assert.matches("lock on h1", res.stderr)
    assert.matches("pid=4242", res.stderr)
    -- nothing touched
    assert.equal(edited, fs.sha256(unit_path))
    lock:unlock()
    res = child("plans/rollback.lua", { "--service", "api", "--no-code" })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.equal(before, fs.sha256(unit_path))
  end)

  it("the REPL's restart(name) and rollback(name) act on the service's host", function()
    local tree_before, started = tree(wd), show("ActiveEnterTimestampMonotonic")
    local input = ('restart("api", { deploy_path = %q })\n'
      .. 'print("version: " .. require("rr.fs").read(%q))\n'
      .. 'rollback("api", { yes = true })\n'):format(release2, wd .. "/version")
    local res, err, _, r = proc.run({ helpers.engine, "-i", "--user", "--services", file }, { stdin = input,
      timeout = 120, cwd = units.root, env = { RR_SSH_CONFIG = cfg, RRENGINE_SERVICES = false, RRENGINE_USER = false } })
    res = res or r or error(err)
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("\n[^\n]*ok: api restarted %([%d.]+ m?s%)\n", res.stdout)
    assert.matches("\n[^\n]*version: good3\n", res.stdout)
    assert.matches("\n[^\n]*rolled back: api %([%d.]+ m?s%)\n", res.stdout)
    assert.equal("", res.stderr)
    -- on h1: restarted (a new start), then the deploy undone byte-identical, and healthy
    assert.are_not.equal(started, show("ActiveEnterTimestampMonotonic"))
    assert.equal(tree_before, tree(wd))
    assert.equal("active", show("ActiveState"))
    assert.is_false(fs.exists(state_root .. "/run.journal"))
  end)
end)
