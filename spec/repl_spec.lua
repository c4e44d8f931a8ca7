-- rrengine -i: the emergency REPL with the services preloaded.
local fs = require("rr.fs")
local proc = require("rr.proc")
local platform = require("spec.support.platform")

local engine = os.getenv("RR_ENGINE") or arg[-1]

-- Lua pattern for a literal string.
local function lit(s)
  return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

describe("the REPL", function()
  local p
  setup(function()
    -- api stabilizes for 1 s: long enough to signal the engine while its flow runs
    p = platform.new({ { name = "db" }, { name = "api", depends = { "db" }, http = true, stabilize = 1 } })
    p:start()
  end)
  teardown(function() p:teardown() end)

  -- The REPL fed `input` on stdin: with REPL options (argv after -i) and no RRENGINE_* variables,
  -- or with no options and the variables.
  local function repl(input, args)
    local argv = { engine, "-i" }
    local env = { XDG_STATE_HOME = p.xdg_state, HOME = p.dir, RRENGINE_SERVICES = false, RRENGINE_USER = false }
    if args then
      for _, a in ipairs(args) do argv[#argv + 1] = a end
    else
      env.RRENGINE_SERVICES, env.RRENGINE_USER = p.services_file, "1"
    end
    local res, err, _, r = proc.run(argv, { stdin = input, timeout = 60, env = env })
    return res or r or error(err)
  end

  local function banner(file)
    return ("rrengine REPL: 2 services from %s (user manager). Try status(), health(name), restart(name), "
      .. "rollback(name), events(), journal(name); help() lists them all, Tab completes.\n"):format(file)
  end

  it("loads the services (RRENGINE_SERVICES, RRENGINE_USER) and shows the status of every one", function()
    local res = repl("status()\n")
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal("", res.stderr)
    assert.equal(banner(p.services_file), res.stdout:sub(1, #banner(p.services_file)))
    assert.matches("\n[^\n]*SERVICE%s+UNIT%s+STATE%s+SUB%s+PID%s+HEALTH\n", res.stdout)
    assert.matches("\n[^\n]*db%s+" .. lit(p.by_name.db.unit) .. "%s+active%s+running%s+%d+%s+healthy", res.stdout)
    assert.matches("\n[^\n]*api%s+" .. lit(p.by_name.api.unit) .. "%s+active%s+running%s+%d+%s+healthy", res.stdout)
  end)

  it("takes --user and --services FILE after -i, without the environment variables", function()
    local res = repl('print(user and "helpers here")\nhealth("api")\n', { "--user", "--services", p.services_file })
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal("", res.stderr)
    assert.equal(banner(p.services_file), res.stdout:sub(1, #banner(p.services_file)))
    assert.matches("\n[^\n]*helpers here\n", res.stdout)
    assert.matches("\n[^\n]*healthy\t", res.stdout)
    -- options the REPL does not know, or engine options after -i, are usage errors (exit 2)
    local bad = repl("", { "--frobnicate" })
    assert.equal(2, bad.exit_code)
    assert.equal("rrengine -i: unknown option --frobnicate (see rrengine --help)\n", bad.stderr)
    local _, _, _, before = proc.run({ engine, "--user", "-i" }, { stdin = "" })
    assert.equal(2, before.exit_code)
    assert.matches("unknown option '%-%-user' %(REPL options go after %-i", before.stderr)
  end)

  it("restarts one service through the same flow, and reports a bad name without dying", function()
    local pid = p:props("api").MainPID
    local res = repl('restart("api")\nrestart("nosuch")\nprint("still here")\n')
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("\n[^\n]*plan: 1 service%(s%) in order: api\n", res.stdout)
    assert.matches("\n[^\n]*✔ api%s+restart ok %([%d.]+ m?s%)  %[1/1%]\n", res.stdout)
    assert.matches("\n[^\n]*ok: api restarted %([%d.]+ m?s%)\n", res.stdout)
    assert.equal('rrengine: unknown service "nosuch"\n', res.stderr)
    assert.matches("\n[^\n]*still here\n", res.stdout)
    assert.are_not.equal(pid, p:props("api").MainPID)
  end)

  it("lets Ctrl-C during restart() finish the service in flight, then takes the next line", function()
    local pid = p:props("api").MainPID
    -- a task sends SIGINT to the engine once the unit has restarted (the flow then stabilizes
    -- for 1 s), while the top level runs restart("api")
    local watch = ('m = require("rr.systemd").user(); u = m:unit(%q); pid0 = u:get("MainPID"); '
      .. 'rr.spawn(function() assert(u:wait_change({ "MainPID" }, 60, { MainPID = pid0 })); '
      .. 'require("rr.proc").run({ "kill", "-INT", tostring(require("rr.fs").getpid()) }) end)\n')
      :format(p.by_name.api.unit)
    local res = repl(watch .. 'restart("api")\nprint("next line")\n')
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal("", res.stderr)
    assert.matches("\n[^\n]*interrupted %(SIGINT%): no new service starts; finishing api %(or rolling it back%)\n",
      res.stdout)
    assert.matches("\n[^\n]*ok: api restarted %([%d.]+ m?s%)\n", res.stdout)
    assert.matches("\n[^\n]*next line\n", res.stdout)
    assert.are_not.equal(pid, p:props("api").MainPID)
  end)

  it("rollback(name) restores the known-good unit file after a hand edit, in process", function()
    local path = p.by_name.api.unit_path
    -- a first run makes the current definition known good
    local res = repl('restart("api")\n', { "--user", "--services", p.services_file })
    assert.matches("\n[^\n]*ok: api restarted", res.stdout)
    local good = assert(fs.read(path))
    local edited, n = good:gsub("ExecStart=[^\n]+", "ExecStart=/nonexistent/bin/api-server", 1)
    assert.equal(1, n)
    assert(fs.write_atomic(path, edited))
    assert.is_true(p:props("api").NeedDaemonReload)

    res = repl('rollback("api")\nprint("after")\n', { "--user", "--services", p.services_file })
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal("", res.stderr)
    -- piped input: no question (spec/repl_tty_spec.lua has the terminal's)
    assert.not_matches("roll back api%?", res.stdout)
    assert.matches("\n[^\n]*↺ api%s+rolling back: manual rollback %(REPL%)\n", res.stdout)
    assert.matches("\n[^\n]*api%s+definition restored from the last known good %(1 file%(s%) put back, 0 removed%)\n",
      res.stdout)
    assert.matches("\n[^\n]*rolled back: api %([%d.]+ m?s%)\n", res.stdout)
    assert.matches("\n[^\n]*after\n", res.stdout)
    assert.equal(good, fs.read(path))
    local props = p:props("api")
    assert.equal("active", props.ActiveState)
    assert.is_false(props.NeedDaemonReload)
    assert.equal(200, require("rr.http").get(p.by_name.api.url).status)
    -- logged where events() looks
    local log = assert(fs.read(p.xdg_state .. "/rrengine/events.jsonl"))
    assert.matches('"event":"ROLLBACK_SUCCESS"[^\n]*"service":"api"', log)
  end)

  it("says why a rollback did not start, and touches nothing", function()
    local res = repl('rollback("db")\n', { "--user", "--services", p.services_file })
    assert.equal(0, res.exit_code, res.stderr)
    -- db never ran through a flow here: no known-good snapshot, no deploy
    assert.matches("\n[^\n]*rollback of db not started: nothing to restore %(no known%-good snapshot of its "
      .. "definition, no deploy to undo%); the service was not touched\n", res.stdout)
  end)

  it("help() lists every helper with an example; help(\"restart\") tells one; a typo gets a suggestion", function()
    local res = repl('help()\nhelp("restart")\nhelp(rollback)\nhelp("restrat")\n')
    assert.equal(0, res.exit_code, res.stderr)
    for _, name in ipairs({ "status", "health", "restart", "rollback", "recover", "events", "journal", "user",
                            "services_file", "help" }) do
      -- the helper, what it is for, and on the next line an example calling it
      assert.matches("\n  " .. name .. "%([^\n]*%)%s+%S[^\n]*\n%s+e%.g%. " .. name .. "%(", res.stdout, name)
      assert.equal("function", type(require("rr.repl").helpers[name]), name)
    end
    assert.matches("\n[^\n]*restart%(name%[, opts%]%): the whole flow of plans/rolling%.lua[^\n]*\n", res.stdout)
    assert.matches("\n  deploy_path = DIR ", res.stdout)
    assert.matches("\n[^\n]*rollback%(name%[, opts%]%): [^\n]*\n", res.stdout)
    assert.matches("\n  yes = true ", res.stdout)
    assert.equal('rrengine: no helper "restrat" (did you mean "restart"?); help() lists them\n', res.stderr)
  end)

  it("suggests the closest service name for a typo, as the command line does", function()
    local res = repl('restart("apj")\nhealth("dv")\nrollback("zzzzzz")\nrestart(api)\n')
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal('rrengine: unknown service "apj" (did you mean "api"?)\n'
      .. 'rrengine: unknown service "dv" (did you mean "db"?)\n'
      .. 'rrengine: unknown service "zzzzzz"\n'
      .. 'rrengine: a service name (a string) is needed, got nil: e.g. restart("db")\n', res.stderr)
    -- the command line's words for the same typo
    local cli = p:cli({ "--service", "apj", "--dry-run" })
    assert.matches('unknown service "apj" %(did you mean "api"%?%)', cli.stderr)
  end)

  it("events(n) prints readable lines (time, event, service, key fields); {raw = true} the JSON", function()
    local res = repl('restart("db")\nevents(3)\nevents(2, { raw = true })\n')
    assert.equal(0, res.exit_code, res.stderr)
    local out = res.stdout:match("ok: db restarted[^\n]*\n(.*)$")
    local lines = {}
    for line in out:gmatch("[^\n]+") do
      if not line:match("^rr>") then lines[#lines + 1] = line end -- the prompt and the line typed
    end
    local readable = table.concat(lines, "\n", 1, 3)
    -- the last three events of the run: db's success, then the end of the plan (PLAN_END has no service)
    assert.matches("^%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d%.%d%d%d%s+SERVICE_RESTART_SUCCESS%s+db%s+method=restart took "
      .. "[%d.]+ m?s", lines[2])
    assert.matches("^%d%d%d%d%-%d%d%-%d%d [%d:.]+%s+PLAN_END%s+%-%s+result=success exit_code=0 took [%d.]+ m?s "
      .. "failed=0 interrupted=false rolled_back=0 skipped=0 succeeded=1$", lines[3])
    assert.not_matches('"event"', readable)
    -- raw: the log's own lines
    local cjson = require("cjson")
    assert.equal("SERVICE_RESTART_SUCCESS", cjson.decode(lines[4]).event)
    assert.equal("PLAN_END", cjson.decode(lines[5]).event)
    assert.equal(5, #lines)
  end)

  it("journal(name) without journald says so and shows what the manager reports", function()
    -- the sandbox has no journald (a tmpfs hides /run/systemd), as a container often has none
    assert.is_nil(fs.stat("/run/systemd/journal/socket"))
    local res = repl('journal("db")\n')
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal("", res.stderr)
    local pid = p:props("db").MainPID
    assert.matches("\n[^\n]*journal: no journald here %(/run/systemd/journal/socket is absent%); what the user manager "
      .. "reports for " .. lit(p.by_name.db.unit) .. ":\n"
      .. "  state:%s+active %(running%) since %d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d UTC\n"
      .. "  result:%s+success\n"
      .. "  main process:%s+pid " .. pid .. ", running\n", res.stdout)
  end)

  it("quits on SIGTERM or SIGHUP (exit 130); SIGINT only cancels the line", function()
    local kill = 'require("rr.proc").run({ "kill", "-%s", tostring(require("rr.fs").getpid()) }); rr.sleep(5)\n'
    for _, sig in ipairs({ "TERM", "HUP" }) do
      local res = repl(kill:format(sig) .. 'print("not reached")\n')
      assert.equal(130, res.exit_code, sig)
      assert.is_nil(res.stdout:find("not reached", 1, true), sig)
    end
    local res = repl(kill:format("INT") .. 'print("next line")\n')
    assert.equal(0, res.exit_code)
    assert.matches("interrupted\n", res.stderr)
    assert.matches("\n[^\n]*next line\n", res.stdout)
  end)
end)

describe("the REPL's rollback(name, {deploy_record = DIR})", function()
  local deploy = require("rr.deploy")
  local state = require("rr.state")
  local http = require("rr.http")
  local p, api
  before_each(function()
    p = platform.new({ { name = "api", http = true, code = true } })
    p:start()
    api = p.by_name.api
  end)
  after_each(function() p:teardown() end)

  local function repl(input)
    local res, err, _, r = proc.run({ engine, "-i", "--user", "--services", p.services_file }, { stdin = input,
      timeout = 60, env = { XDG_STATE_HOME = p.xdg_state, HOME = p.dir, RRENGINE_SERVICES = false,
        RRENGINE_USER = false } })
    return res or r or error(err)
  end

  local function served_version()
    local res = http.get(api.url, { timeout = 2 })
    return res and res.body and res.body:match("version=(%S+)") or nil
  end

  it("undoes the deploy it names, as plans/rollback.lua --deploy-record does, and refuses another dir's", function()
    local src = p.dir .. "/releases/run-c"
    require("spec.support.helpers").write(src .. "/version", "v9\n")
    local record = assert(deploy.apply{ source = src, target = api.working_dir, checksum = true,
      state_dir = p.state_root .. "/runs/run-c/api" })
    assert(state.write_pointer(p.state_root, "api", "last", record.state_dir))
    assert(p:unit("api"):restart("replace"))
    local deadline = require("rr").now() + 10
    while served_version() ~= "v9" and require("rr").now() < deadline do require("rr").sleep(0.05) end
    assert.equal("v9", served_version())

    -- the same record in another service's working dir: refused, nothing touched
    local other = p.dir .. "/other-code"
    assert(fs.mkdir_p(other, 493))
    local foreign = assert(deploy.apply{ source = src, target = other, state_dir = p.state_root .. "/runs/other/x" })
    local res = repl(('rollback("api", {deploy_record = %q})\nrollback("api", {deploy_record = %q, no_code = true})\n')
      :format(foreign.state_dir, record.state_dir))
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("\n[^\n]*rollback of api not started: the deploy record " .. lit(foreign.state_dir)
      .. " is a deploy into " .. lit(other) .. ", not into api's working_dir", res.stdout)
    assert.matches("rrengine: deploy_record and no_code contradict each other", res.stderr)
    assert.equal("applied", assert(deploy.load(foreign.state_dir)).state)
    assert.equal("v9", served_version())

    res = repl(('rollback("api", {deploy_record = %q})\n'):format(record.state_dir))
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal("", res.stderr)
    assert.matches("\n[^\n]*deploy record " .. lit(record.state_dir) .. " %(from deploy_record%): state applied",
      res.stdout)
    assert.matches("\n[^\n]*rolled back: api %([%d.]+ m?s%)\n", res.stdout)
    assert.equal("v1", served_version())
    assert.equal("undone", assert(deploy.load(record.state_dir)).state)
    assert.is_nil(state.read_pointer(p.state_root, "api", "last"))
  end)
end)

describe("what a rollback says, once", function()
  local p
  setup(function()
    p = platform.new({ { name = "api", http = true, code = true,
      migrate = { "/bin/sh", "-c", "echo up >> db.txt" } } })
    p:start()
  end)
  teardown(function() p:teardown() end)

  local function repl(input)
    local res, err, _, r = proc.run({ engine, "-i", "--user", "--services", p.services_file }, { stdin = input,
      timeout = 60, env = { XDG_STATE_HOME = p.xdg_state, HOME = p.dir, RRENGINE_SERVICES = false,
        RRENGINE_USER = false } })
    return res or r or error(err)
  end

  local function count(text, pattern)
    return select(2, text:lower():gsub(pattern, ""))
  end

  it("a broken release rolled back: migrations not undone said once, an unchanged definition not as a restore", function()
    local release = p.dir .. "/release"
    require("spec.support.helpers").write(release .. "/api.control", "status=500\n") -- the new release is broken
    local res = repl(('restart("api", { deploy_path = %q })\n'):format(release))
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("\n[^\n]*failed %(exit 1%): api: unhealthy after restart[^\n]*; rolled back: api\n", res.stdout)
    assert.equal(1, count(res.stdout, "migrations are not undone"), res.stdout)
    assert.matches("\n[^\n]*! api%s+migrations are not undone; the old code runs against the migrated database\n", res.stdout)
    -- the deploy changed no unit file: nothing of the definition was put back, and it says so
    assert.matches("\n[^\n]*  api%s+definition unchanged since the last known good: nothing to put back\n", res.stdout)
    assert.equal(0, count(res.stdout, "put back, 0 removed"), res.stdout)
    -- the event log still has both facts, for the record
    local log = assert(fs.read(p.xdg_state .. "/rrengine/events.jsonl"))
    assert.matches('"event":"ROLLBACK_START"[^\n]*"migrations_not_undone":true', log)
    assert.matches('"event":"DEFINITION_RESTORED"', log)
    assert.equal(200, require("rr.http").get(p.by_name.api.url).status)
  end)
end)

-- A unit name that gets past the engine's own check but that the manager refuses to load
-- (a template without its instance; services.lua validation would refuse it, a table built in
-- Lua need not go through it): m:unit() returns nil, err, code, and every helper reports it.
describe("the REPL's helpers and rr.status when the manager cannot load a unit", function()
  local repl = require("rr.repl")
  local status = require("rr.status")
  local svc = { name = "tmpl", unit = "rrtmpl@.service", depends = {}, stabilize = 0,
    health = { kind = "systemd", timeout = 1, retries = 0, interval = 1 } }
  local saved
  setup(function()
    saved = { manager = repl.env.manager, platform = repl.env.platform, user = repl.env.user }
    repl.env.user = true
    repl.env.manager = platform.manager()
    repl.env.platform = { services = { svc }, by_name = { tmpl = svc } }
  end)
  teardown(function()
    repl.env.manager, repl.env.platform, repl.env.user = saved.manager, saved.platform, saved.user
  end)

  it("status.collect reports the load failure in the row", function()
    local rows = status.collect(platform.manager(), { svc })
    assert.equal(1, #rows)
    assert.equal("unknown", rows[1].health)
    assert.equal("?", rows[1].active)
    assert.equal("cannot load rrtmpl@.service: Unit name rrtmpl@.service is missing the instance name.",
      rows[1].detail)
    assert.matches("tmpl%s+rrtmpl@%.service%s+%?%s+%?%s+%-%s+unknown %(cannot load", status.format(rows))
  end)

  it("health(name) says unhealthy and why, without a Lua error", function()
    local ok, kind, detail = pcall(repl.helpers.health, "tmpl")
    assert.is_true(ok, kind)
    assert.equal("unhealthy", kind)
    assert.equal("cannot load rrtmpl@.service: Unit name rrtmpl@.service is missing the instance name.", detail)
  end)
end)
