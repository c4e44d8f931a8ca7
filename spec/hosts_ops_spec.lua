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

  it("the dry run reads a remote service on its host, takes no lock and touches nothing", function()
    local res = rolling({ "--service", "api", "--deploy", "--deploy-path", release })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    local text = assert(fs.read(unit_path))
    helpers.edit(unit_path, "%[Service%]", "[Service]\nEnvironment=EDITED=3")
    -- another run holds h1's lock: a dry run does not need it
    local lock <close> = assert(remote.lock("h1", { ssh_config = cfg, holder = "host=spec pid=4242",
      path = state_root .. "/run.lock" }))
    local unit_edited, started, listing = fs.sha256(unit_path), show("ActiveEnterTimestampMonotonic"), state_listing()
    res = rolling({ "--dry-run", "--diff", "--service", "api", "--deploy", "--deploy-path", release2 })
    local listing_after = state_listing()
    lock:unlock()
    local unit_after = fs.sha256(unit_path)
    assert(fs.write_atomic(unit_path, text))
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("now: active, healthy", res.stdout)
    assert.matches("rollback restores: the known%-good definition of run", res.stdout)
    assert.matches("definition modified: " .. unit_path:gsub("%p", "%%%0"), res.stdout)
    assert.matches("\n%s+%+Environment=EDITED=3\n", res.stdout)
    assert.matches("last deploy on h1: " .. (state_root .. "/runs/"):gsub("%p", "%%%0"), res.stdout)
    assert.matches("deploy: rsync %-a " .. release2:gsub("%p", "%%%0"), res.stdout)
    assert.matches("daemon%-reload first", res.stdout)
    -- nothing touched on h1: its state root, the unit file, the unit
    assert.equal(listing, listing_after)
    assert.equal(started, show("ActiveEnterTimestampMonotonic"))
    assert.equal("good2\n", fs.read(wd .. "/version"))
    assert.equal(unit_edited, unit_after)
  end)

  it("a remote migration of a killed engine blocks --recover (exit 4, naming its unit) until it has ended", function()
    local tree_before = tree(wd)
    local fifo = dir .. "/go"
    assert(proc.run({ "mkfifo", fifo }))
    services_file((', migrate = { "/bin/sh", "-c", %q, "m", %q }'):format('echo waiting for go; read x < "$1"', fifo))
    local argv = { helpers.engine, "plans/rolling.lua", "--user", "--services", file, "--ssh-config", cfg,
      "--events", dir .. "/events.jsonl", "--service", "api", "--deploy", "--deploy-path", release2 }
    -- the migration's own line: it runs on h1
    local p = hosts.spawn_until(argv, "waiting for go", 60, { cwd = units.root })
    p:kill("SIGKILL")
    p:wait()
    p:close()
    local j = assert(host_journal())
    local unit = assert(j.services.api.children[1].unit)
    assert.matches("^rrengine%-migration%-api%-%x+%.service$", unit)

    local res = rolling({ "--recover" })
    assert.equal(4, res.exit_code, res.stdout .. res.stderr)
    assert.matches("still running from the interrupted run: unit " .. unit:gsub("%p", "%%%0") .. " on h1", res.stderr)
    -- untouched meanwhile: the release is still there, the journal too
    assert.equal("good3\n", fs.read(wd .. "/version"))
    assert.is_true(fs.exists(state_root .. "/run.journal"))
    -- a plain run names it too
    res = rolling({})
    assert.equal(4, res.exit_code, res.stdout .. res.stderr)
    assert.matches("still running from that run: unit " .. unit:gsub("%p", "%%%0") .. " on h1", res.stderr)

    -- the migration ends; then --recover resolves: the deploy undone
    assert(proc.run({ "sh", "-c", 'echo go > "$0"', fifo }, { timeout = 30 }))
    wait_gone(unit)
    res = rolling({ "--recover" })
    services_file()
    assert.equal(1, res.exit_code, res.stdout .. res.stderr)
    assert.equal(tree_before, tree(wd))
    assert.is_false(fs.exists(state_root .. "/run.journal"))
  end)

  it("plans/status.lua tells whether the run that wrote a host's journal still runs, or that it cannot tell", function()
    local path = state_root .. "/run.journal"
    local function write_journal(engine_host, pid)
      local head = { record = "run", version = 2, run = "r-spec", pid = pid, pid_start = journal.start_time(pid),
        boot_id = journal.boot_id(), user = true, argv = {}, services_file = file, started_at = "2026-01-01T00:00:00Z",
        kind = "rolling", order = { "api" }, host = "h1", engine_host = engine_host }
      local set = { record = "set", service = "api", set = { phase = "migrate" } }
      assert(fs.write_atomic(path, cjson.encode(head) .. "\n" .. cjson.encode(set) .. "\n"))
    end
    local function status()
      return child("plans/status.lua", {})
    end
    -- written on this machine by a process that runs (this one): a run in progress
    write_journal(journal.hostname(), fs.getpid())
    local res = status()
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("== on host h1 %(" .. state_root:gsub("%p", "%%%0") .. "%): run r%-spec is in progress %(pid "
      .. fs.getpid() .. " on this machine", res.stdout)
    -- written by an engine on another machine: its pid means nothing here
    write_journal("ci-elsewhere", fs.getpid())
    res = status()
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("%?%? on host h1 [^\n]*: a run journal written by an engine on ci%-elsewhere, pid " .. fs.getpid()
      .. " %(run r%-spec[^\n]*%): cannot tell whether it still runs\n", res.stdout)
    assert.matches("%?%?   api: left in phase migrate", res.stdout)
    assert.not_matches("interrupted", res.stdout)
    -- the dry run says the same
    res = rolling({ "--dry-run" })
    assert.matches("%?%? on host h1 [^\n]*: a run journal written by an engine on ci%-elsewhere", res.stdout)
    -- and the REPL's status()
    local rres, rerr, _, rr_ = proc.run({ helpers.engine, "-i", "--user", "--services", file }, { stdin = "status()\n",
      timeout = 60, cwd = units.root, env = { RR_SSH_CONFIG = cfg, RRENGINE_SERVICES = false, RRENGINE_USER = false } })
    rres = rres or rr_ or error(rerr)
    assert.matches("%?%? on host h1 [^\n]*: a run journal written by an engine on ci%-elsewhere", rres.stdout)
    -- written here by a process that has ended: an interrupted run (exit 4)
    local gone = assert(proc.spawn({ "true" }))
    local gone_pid = gone:pid()
    gone:wait()
    gone:close()
    write_journal(journal.hostname(), gone_pid)
    res = status()
    fs.remove(path)
    assert.equal(4, res.exit_code, res.stdout .. res.stderr)
    assert.matches("!! on host h1 [^\n]*: an earlier run was interrupted: run r%-spec %(pid " .. gone_pid, res.stdout)
    assert.matches("!!   api: left in phase migrate", res.stdout)
  end)
end)
