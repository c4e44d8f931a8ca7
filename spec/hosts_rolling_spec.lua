-- Rolling restarts across hosts: a platform on two test hosts and this machine, with
-- dependencies across them, run by a child engine (plans/rolling.lua) against real sshd servers
-- and real user managers (spec/support/hosts.lua), one sandbox per host.
--
--   spec/support/run-specs ./rrengine spec/hosts_rolling_spec.lua
local proc = require("rr.proc")
local fs = require("rr.fs")
local cjson = require("cjson")
local systemd = require("rr.systemd")
local remote = require("rr.remote")
local hosts = require("spec.support.hosts")
local units = require("spec.support.units")
local helpers = require("spec.support.helpers")

-- A oneshot that stays active and fails to start when its working dir's version says "bad".
local function checked_unit(wd)
  return { exec = { "/bin/sh", "-c", ('test "$(cat %s/version)" != bad'):format(wd) }, type = "oneshot",
    extra_service = { RemainAfterExit = "yes" } }
end

describe("rolling restarts across hosts", function()
  local hs, dir, cfg, file, wd, release, bad, args_file

  local function engine(args, opts)
    local argv = { helpers.engine, "plans/rolling.lua", "--user", "--services", file, "--ssh-config", cfg,
      "--events", dir .. "/events.jsonl" }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    local res, _, _, r = proc.run(argv, { timeout = 120, cwd = units.root, capture = true })
    local out = res or r
    assert(out and not out.timed_out, "the engine did not finish within 120 s")
    return out
  end

  local function show(h, prop, unit)
    local res = assert(proc.run(hosts.ssh(h, "systemctl --user show --value -p " .. prop .. " " .. unit)))
    return (res.stdout:gsub("\n$", ""))
  end

  -- sha256 of every file below d (relative path -> hash), read on the host over ssh
  local function tree(h, d)
    local res = assert(proc.run(hosts.ssh(h, "cd " .. d .. " && find . -type f -print0 | sort -z | xargs -0 sha256sum")))
    return res.stdout
  end

  local function services_file(extra_api)
    local api = ([[{ name = "api", unit = "rrhr-api.service", host = "h2", depends = { "db" }, stabilize = 0,
        working_dir = %q %s }]]):format(wd, extra_api or "")
    helpers.write(file, ([[return {
  defaults = { stabilize = 0, health = { timeout = 20 } },
  services = {
    { name = "db", unit = "rrhr-db.service", host = "h1" },
    %s,
    { name = "web", unit = "rrhr-web.service", depends = { "api" } },
    { name = "jobs", unit = "rrhr-jobs.service", host = "h1" },
  },
}
]]):format(api))
  end

  lazy_setup(function()
    hs = hosts.start(2)
    cfg = hs[1].ssh_config
    dir = assert(fs.mkdtemp("/tmp/rr-hosts-rolling-"))
    file = dir .. "/services.lua"
    wd = hs[2].dir .. "/app"
    release, bad = dir .. "/release", dir .. "/bad"
    args_file = wd .. "/args.out"
    helpers.write(wd .. "/version", "good\n")
    helpers.write(wd .. "/keep.txt", "kept\n")
    helpers.write(release .. "/version", "good2\n")
    helpers.write(release .. "/new.txt", "new\n")
    helpers.write(bad .. "/version", "bad\n")
    helpers.write(bad .. "/other.txt", "other\n")
    local sleep = { exec = { "/bin/sleep", "1000" } }
    hs[1]:write_unit("rrhr-db.service", sleep)
    hs[1]:write_unit("rrhr-jobs.service", sleep)
    hs[2]:write_unit("rrhr-api.service", checked_unit(wd))
    units.write("rrhr-web.service", sleep)
    for _, h in ipairs(hs) do
      local m <close> = assert(systemd.remote(h.name, { user = true, ssh_config = cfg }))
      assert(m:daemon_reload())
      for _, u in ipairs(h.name == "h1" and { "rrhr-db.service", "rrhr-jobs.service" } or { "rrhr-api.service" }) do
        assert(assert(m:unit(u)):start())
      end
    end
    local here <close> = assert(systemd.user())
    assert(here:daemon_reload())
    assert(assert(here:unit("rrhr-web.service")):start())
    services_file()
  end)

  lazy_teardown(function()
    if hs then hosts.stop(hs) end
    if dir then fs.remove_tree(dir) end
  end)

  it("restarts in dependency order across hosts, each on its own host, and leaves no journal", function()
    local res = engine({ "--parallel", "0" })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    local db = tonumber(show(hs[1], "ActiveEnterTimestampMonotonic", "rrhr-db.service"))
    local api = tonumber(show(hs[2], "ActiveEnterTimestampMonotonic", "rrhr-api.service"))
    local here <close> = assert(systemd.user())
    local web = assert(assert(here:unit("rrhr-web.service")):get("ActiveEnterTimestampMonotonic"))
    assert.is_true(db > 0 and db < api, ("db %d, api %d"):format(db, api))
    assert.is_true(api < web, ("api %d, web %d"):format(api, web))
    assert.matches("  h2%s+api%s", res.stdout) -- its host in the column
    for _, h in ipairs(hs) do
      assert.is_false(fs.exists(h.env.XDG_STATE_HOME .. "/rrengine/run.journal"))
    end
    -- the known-good snapshot of api is on h2, in h2's state root
    assert.is_true(fs.exists(hs[2].env.XDG_STATE_HOME .. "/rrengine/snapshots/api/current"))
  end)

  it("-H runs one host's services only", function()
    local before = show(hs[2], "ActiveEnterTimestampMonotonic", "rrhr-api.service")
    local res = engine({ "-H", "h1" })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("  h1%s+db%s", res.stdout)
    assert.matches("  h1%s+jobs%s", res.stdout)
    assert.not_matches("api", res.stdout)
    assert.equal(before, show(hs[2], "ActiveEnterTimestampMonotonic", "rrhr-api.service"))
    local res2 = engine({ "-H", "h9" })
    assert.equal(2, res2.exit_code)
    assert.matches("no service of .* is on host h9", res2.stderr)
  end)

  it("runs a migration on its host with every byte of its arguments, through systemd-run", function()
    local awkward = { "a b", "it's", '"q"', "$HOME", "back\\slash", "tab\there", "%n" }
    local words = {}
    for _, a in ipairs(awkward) do words[#words + 1] = ("%q"):format(a) end
    services_file((', migrate = { "/bin/sh", "-c", %q, %q, %s }'):format('printf "%s\\n" "$@" > "$0"', args_file,
      table.concat(words, ", ")))
    local res = engine({ "--service", "api" })
    services_file()
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    local migration = {}
    for line in (fs.read(dir .. "/events.jsonl") or ""):gmatch("[^\n]+") do
      if line:find("MIGRATION", 1, true) then migration[#migration + 1] = line end
    end
    assert.equal(table.concat(awkward, "\n") .. "\n", fs.read(args_file), table.concat(migration, "\n"))
    fs.remove(args_file)
  end)

  it("deploys to a host and rolls back byte-identical: the code and the known-good unit file", function()
    local unit_path = hs[2].unit_dir .. "/rrhr-api.service"
    local unit_before = fs.sha256(unit_path)
    local tree_before = tree(hs[2], wd)
    -- an edit systemd has not loaded yet, and a release that fails to start
    local text = assert(fs.read(unit_path))
    assert(fs.write_atomic(unit_path, (text:gsub("%[Service%]", "[Service]\nEnvironment=EDITED=1"))))
    local res = engine({ "--service", "api", "--deploy", "--deploy-path", bad })
    assert.equal(1, res.exit_code, res.stdout .. res.stderr)
    assert.equal(unit_before, fs.sha256(unit_path))
    assert.equal(tree_before, tree(hs[2], wd))
    assert.equal("active", show(hs[2], "ActiveState", "rrhr-api.service"))
    -- the deploy record is on h2, undone
    local records = assert(fs.list(hs[2].env.XDG_STATE_HOME .. "/rrengine/runs"))
    assert.is_true(#records >= 1)
    -- and a good release deploys
    res = engine({ "--service", "api", "--deploy", "--deploy-path", release })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.equal("good2\n", fs.read(wd .. "/version"))
    assert.equal("kept\n", fs.read(wd .. "/keep.txt"))
  end)

  it("holds a lock per host: a second engine is refused naming the host and the holder", function()
    local lock <close> = assert(remote.lock("h1", { ssh_config = cfg, holder = "host=spec pid=4242",
      path = hs[1].env.XDG_STATE_HOME .. "/rrengine/run.lock" }))
    local res = engine({})
    assert.equal(1, res.exit_code)
    assert.matches("h1", res.stderr)
    assert.matches("pid=4242", res.stderr)
  end)

  it("recovers a deploy on a host after the engine was killed mid-way; the lock died with it", function()
    local tree_before = tree(hs[2], wd)
    services_file(', migrate = { "/bin/sleep", "3" }')
    local argv = { helpers.engine, "plans/rolling.lua", "--user", "--services", file, "--ssh-config", cfg,
      "--events", dir .. "/events.jsonl", "--service", "api", "--deploy", "--deploy-path", bad }
    local p = hosts.spawn_until(argv, "h2%s+api%s+migrate", 60, { cwd = units.root })
    p:kill("SIGKILL")
    p:wait()
    p:close()
    assert.equal("bad\n", fs.read(wd .. "/version"))
    -- its migration goes on on h2 (a transient unit there, in the journal): --recover leaves api
    -- alone until it has ended (spec/hosts_ops_spec.lua), so wait for that
    local j = require("rr.journal").read(hs[2].env.XDG_STATE_HOME .. "/rrengine")
    for _, c in ipairs(j and j.services.api and j.services.api.children or {}) do
      local m <close> = assert(systemd.remote("h2", { user = true, ssh_config = cfg }))
      local u = c.unit and m:unit(c.unit)
      if u then assert(u:wait_state({ "inactive", "failed" }, 60)) end
    end
    -- the lock died with the engine: taken at once
    local lock = assert(remote.lock("h2", { ssh_config = cfg, wait = 10,
      path = hs[2].env.XDG_STATE_HOME .. "/rrengine/run.lock" }))
    lock:unlock()
    local res = engine({})
    assert.equal(4, res.exit_code, res.stdout .. res.stderr)
    assert.matches("on host h2", res.stderr)
    assert.matches("api: left in phase migrate", res.stderr)
    res = engine({ "--recover" })
    services_file()
    assert.equal(1, res.exit_code, res.stdout .. res.stderr)
    assert.equal(tree_before, tree(hs[2], wd))
    assert.is_false(fs.exists(hs[2].env.XDG_STATE_HOME .. "/rrengine/run.journal"))
  end)

  it("a host lost mid-run: its service fails clearly, nothing new starts there, the others finish", function()
    -- jobs on h1 waits in its migration while h1 drops; api (h2) and web (here) do not need h1's jobs
    services_file()
    local text = assert(fs.read(file))
    text = text:gsub('{ name = "jobs", unit = "rrhr%-jobs.service", host = "h1" }',
      '{ name = "jobs", unit = "rrhr-jobs.service", host = "h1", working_dir = "/tmp",'
      .. ' migrate = { "/bin/sleep", "30" } },\n    { name = "late", unit = "rrhr-db.service", host = "h1", depends = { "jobs" } }')
    text = text:gsub('{ name = "db", unit = "rrhr%-db.service", host = "h1" },', '')
    text = text:gsub('depends = { "db" }, ', '')
    helpers.write(file, text)
    -- --json: the summary on stdout (into a file), the progress lines on stderr (watched)
    local argv = { "sh", "-c", 'exec "$@" >"$0"', dir .. "/summary.json", helpers.engine, "plans/rolling.lua",
      "--user", "--services", file, "--ssh-config", cfg, "--events", dir .. "/events.jsonl",
      "--service", "jobs,late,api", "--parallel", "0", "--json" }
    local p = hosts.spawn_until(argv, "h1%s+jobs%s+migrate", 60, { cwd = units.root })
    hs[1]:kill()
    local res, _, _, r = p:wait()
    res = res or r
    p:close()
    services_file()
    local text = fs.read(dir .. "/summary.json") or ""
    assert.equal(4, res.exit_code, text)
    local summary = cjson.decode(text)
    assert.same({ "h1" }, summary.hosts_lost)
    assert.same({ "jobs" }, summary.services_unresolved)
    assert.same({ "api" }, summary.services_succeeded)
    assert.same({ "late" }, summary.services_skipped)
    assert.matches("host h1 was lost", summary.message)
    assert.matches("--recover", summary.message)
    for _, e in ipairs(summary.services) do
      if e.name == "jobs" then assert.matches("host h1 was lost in phase migrate", e.error) end
    end
  end)
end)
