-- Releases on a remote host: a blue-green service whose two instances run on a test host's
-- manager (spec/support/hosts.lua: a real sshd and a real user manager), behind a real HAProxy on
-- this machine (the instances listen on 127.0.0.1, as every test host does), released by a child
-- engine (plans/rolling.lua, plans/rollback.lua) as an operator runs it. Everything the release
-- records (the live colour, the known-good snapshot, the deploy records, the journal) is on the
-- host: the specs read it there over ssh.
--
--   spec/support/run-specs ./rrengine spec/hosts_releases_spec.lua
local proc = require("rr.proc")
local fs = require("rr.fs")
local http = require("rr.http")
local cjson = require("cjson")
local haproxy = require("rr.haproxy")
local health = require("rr.health")
local systemd = require("rr.systemd")
local hosts = require("spec.support.hosts")
local units = require("spec.support.units")
local helpers = require("spec.support.helpers")
local hx = require("spec.support.haproxy")
local platform = require("spec.support.platform")

local COLOURS = { "blue", "green" }

local function output(res)
  return ("exit %s\nstdout:\n%s\nstderr:\n%s"):format(tostring(res.exit_code), res.stdout or "", res.stderr or "")
end

-- plans/rolling.lua (or opts.plan) through the command line, with the services file and event log
-- in dir, the ssh config cfg, this machine's state under state_home.
local function run_engine(dir, cfg, state_home, args, opts)
  opts = opts or {}
  local argv = { helpers.engine, opts.plan or "plans/rolling.lua", "--user", "--services", opts.services or
    (dir .. "/services.lua"), "--ssh-config", cfg, "--events", dir .. "/events.jsonl" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local res, _, _, r = proc.run(argv, { timeout = 120, cwd = units.root, capture = true,
    env = { XDG_STATE_HOME = state_home } })
  local out = res or r
  assert(out and not out.timed_out, "the engine did not finish within 120 s")
  return out
end

describe("a blue-green release on a remote host", function()
  local hs, h, cfg, dir, state_home, hxp, hp, template, colours, releases = nil, nil, nil, nil, nil, nil, nil, nil, {}, 0

  local function engine(args, opts) return run_engine(dir, cfg, state_home, args, opts) end

  local function remote_manager()
    return assert(systemd.remote(h.name, { user = true, ssh_config = cfg }))
  end

  local function unit_get(colour, prop)
    local m <close> = remote_manager()
    return assert(m:unit(colours[colour].unit)):get(prop)
  end

  -- a file of the host's state root, read on the host over ssh (nil when it is not there)
  local function host_state(rel)
    local res = proc.run(hosts.ssh(h, "cat", '"$XDG_STATE_HOME"/rrengine/' .. rel))
    return res and res.stdout or nil
  end

  local function live()
    local text = host_state("bluegreen/web.live")
    return text and text:match("^(%a+)")
  end

  -- sha256 of every file below a colour's working dir, read on the host over ssh
  local function tree(colour)
    local res = assert(proc.run(hosts.ssh(h, "cd " .. colours[colour].working_dir
      .. " && find . -type f -print0 | sort -z | xargs -0 sha256sum")))
    return res.stdout
  end

  local function running(colour)
    local res = http.get(colours[colour].url, { timeout = 2 })
    return res and res.body:match("version=(%S+)")
  end

  -- the BLUEGREEN_SWITCHED events of the log so far
  local function switches()
    local out = {}
    for line in (fs.read(dir .. "/events.jsonl") or ""):gmatch("[^\n]+") do
      local ev = cjson.decode(line)
      if ev.event == "BLUEGREEN_SWITCHED" then out[#out + 1] = ev end
    end
    return out
  end

  local function admin(colour)
    return assert(hp:state(colours[colour].server)).admin
  end

  local function release(name, files)
    releases = releases + 1
    local version = ("%s-%d"):format(name, releases)
    local d = ("%s/releases/%s"):format(dir, version)
    helpers.write(d .. "/version", version .. "\n")
    for rel, text in pairs(files or {}) do helpers.write(d .. "/" .. rel, text) end
    return d, version
  end

  local function services_file(bg_over, path)
    local bg = { balancer = { haproxy = hxp.socket, backend = "web" }, soak = 1, drain_timeout = 5 }
    for _, colour in ipairs(COLOURS) do
      local c = colours[colour]
      bg[colour] = { working_dir = c.working_dir, health = { url = c.url }, balancer_server = c.server }
    end
    for k, v in pairs(bg_over or {}) do bg[k] = v end
    local tbl = { defaults = { health = { timeout = 5, retries = 1, interval = 0.2 }, stabilize = 0 },
      services = { { name = "web", unit = template, host = h.name, stabilize = 0.3, blue_green = bg } } }
    path = path or (dir .. "/services.lua")
    helpers.write(path, "return " .. platform.serialize(tbl) .. "\n")
    return path
  end

  lazy_setup(function()
    hs = hosts.start(1)
    h = hs[1]
    cfg = h.ssh_config
    dir = assert(fs.mkdtemp("/tmp/rr-hosts-releases-"))
    state_home = dir .. "/state"
    template = "rrhrel-web@.service"
    -- the instances' files are on the host (its directory): port, version, control file per colour
    local servers = {}
    for _, colour in ipairs(COLOURS) do
      local c = { port = units.free_port(), working_dir = h.dir .. "/code/" .. colour, server = "web_" .. colour,
        unit = "rrhrel-web@" .. colour .. ".service" }
      c.url = ("http://127.0.0.1:%d/health"):format(c.port)
      helpers.write(h.dir .. "/" .. colour .. ".port", c.port .. "\n")
      helpers.write(c.working_dir .. "/version", "v1-" .. colour .. "\n")
      helpers.write(c.working_dir .. "/app.lua", "return 'old code'\n")
      colours[colour] = c
      servers[#servers + 1] = { name = c.server, port = c.port }
    end
    assert(fs.mkdir_p(h.dir .. "/log", 493))
    local exec = ("/bin/sh -c 'exec %s --host 127.0.0.1 --port \"$$(cat %s/%%i.port)\" --version-file %s/code/%%i/version "
      .. "--control-file %s/code/%%i/app.control --delay-ms 5'"):format(units.fixture_bin, h.dir, h.dir, h.dir)
    assert(fs.write_atomic(h.unit_dir .. "/" .. template, table.concat({
      "[Unit]", "Description=rrengine remote blue-green fixture %i", "StartLimitIntervalSec=0", "",
      "[Service]", "Type=simple", "ExecStart=" .. exec, ("StandardOutput=append:%s/log/web-%%i.log"):format(h.dir), "",
    }, "\n")))
    local m <close> = remote_manager()
    assert(m:daemon_reload())
    local blue = assert(m:unit(colours.blue.unit))
    assert(blue:start("replace"))
    assert(health.check(blue, { kind = "http", url = colours.blue.url, timeout = 10, retries = 3, interval = 0.2 }))
    hxp = hx.start({ servers = servers, backend = "web" })
    hp = assert(haproxy.new({ socket = hxp.socket, backend = "web" }))
    assert(hp:drain(colours.green.server))
    services_file()
  end)

  lazy_teardown(function()
    if hxp then hxp:stop() end
    if hs then hosts.stop(hs) end
    if dir then fs.remove_tree(dir) end
  end)

  it("deploys into the idle colour on the host, switches, stops the old colour; the live colour is the host's", function()
    local d, version = release("good")
    local blue_tree = tree("blue")
    assert.is_nil(live())
    local res = engine({ "--service", "web", "--deploy", "--deploy-path", d })
    assert.equal(0, res.exit_code, output(res))
    -- the new release runs in green on the host, and serves; blue stopped, its code untouched
    assert.equal("green", live())
    assert.equal("active", unit_get("green", "ActiveState"))
    assert.equal("inactive", unit_get("blue", "ActiveState"))
    assert.equal(version, running("green"))
    assert.equal(version .. "\n", assert(fs.read(colours.green.working_dir .. "/version")))
    assert.equal(blue_tree, tree("blue"))
    assert.equal("ready", admin("green"))
    assert.equal("drain", admin("blue"))
    -- its records are the host's: known good and the deploy there, nothing in this machine's root
    assert.is_truthy(host_state("snapshots/web/current"))
    assert.is_truthy(host_state("deploys/web.last"))
    assert.is_nil(host_state("run.journal"))
    assert.is_false(fs.exists(state_home .. "/rrengine/bluegreen/web.live"))
    assert.is_false(fs.exists(state_home .. "/rrengine/snapshots/web"))
  end)

  it("plans/status.lua names the live colour recorded on the host", function()
    local res = proc.run({ helpers.engine, "plans/status.lua", "--user", "--services", dir .. "/services.lua",
      "--ssh-config", cfg }, { timeout = 60, cwd = units.root, capture = true, env = { XDG_STATE_HOME = state_home } })
    assert.is_truthy(res, "status failed")
    assert.matches("web %[green, live%]", res.stdout)
    assert.matches("web %[blue, idle%]", res.stdout)
  end)

  it("the dry run reads the host: its live colour and instances", function()
    local d = release("dry")
    local res = engine({ "--service", "web", "--dry-run", "--deploy", "--deploy-path", d })
    assert.equal(0, res.exit_code, output(res))
    assert.matches("green: [^\n]*active[^\n]*<%- live %(recorded%)", res.stdout)
    assert.matches("blue: [^\n]*inactive[^\n]*%(idle%)", res.stdout)
    assert.matches("deploy: rsync %-a [^\n]* %-> " .. colours.blue.working_dir:gsub("%p", "%%%0") .. "/", res.stdout)
  end)

  it("a restart without --deploy serves the live release from the other colour on the host", function()
    local version, green_tree = running("green"), tree("green")
    assert.are_not.equal(green_tree, tree("blue")) -- blue still holds the release before
    local res = engine({ "--service", "web" })
    assert.equal(0, res.exit_code, output(res))
    assert.equal("blue", live())
    assert.equal(version, running("blue"))
    assert.equal(green_tree, tree("blue"))
    assert.equal(green_tree, tree("green"))
    assert.equal("inactive", unit_get("green", "ActiveState"))
    -- nothing of the copy is left here
    assert.same({}, (function()
      local left = {}
      for _, n in ipairs(fs.list("/tmp") or {}) do if n:match("^rrengine%-release%.") then left[#left + 1] = n end end
      return left
    end)())
    -- back to green, the same release, for the cases below
    res = engine({ "--service", "web" })
    assert.equal(0, res.exit_code, output(res))
    assert.equal("green", live())
    assert.equal(version, running("green"))
  end)

  it("an analysis failing after the switch: traffic back, the new colour stopped, its dir byte-identical", function()
    assert.equal("green", live())
    local blue_tree = tree("blue")
    local green_pid = unit_get("green", "MainPID")
    local analysis = helpers.write(dir .. "/analysis.lua",
      "return function(info) return false, 'synthetic: error budget spent on ' .. info.live.colour end\n")
    local file = services_file({ analysis = analysis, soak = 2 }, dir .. "/analysis-services.lua")
    local d = release("soakfail", { ["new.txt"] = "new\n" })
    local before = #switches()
    local res = engine({ "--service", "web", "--deploy", "--deploy-path", d }, { services = file })
    assert.equal(1, res.exit_code, output(res))
    assert.matches("analysis: synthetic: error budget spent on blue", res.stdout .. res.stderr)
    -- it had switched to blue, then back to green
    local sw = switches()
    assert.equal(before + 2, #sw, output(res))
    assert.equal("blue", sw[#sw - 1].to)
    assert.equal("green", sw[#sw].to)
    assert.is_true(sw[#sw].back)
    -- green kept serving; blue stopped, its working dir as it was (the new files gone)
    assert.equal("green", live())
    assert.equal(green_pid, unit_get("green", "MainPID"))
    assert.equal("ready", admin("green"))
    assert.equal("drain", admin("blue"))
    assert.equal("inactive", unit_get("blue", "ActiveState"))
    assert.equal(blue_tree, tree("blue"))
    assert.is_nil(host_state("run.journal"))
  end)

  it("plans/rollback.lua --service: back to the release the idle colour on the host still has", function()
    assert.equal("green", live())
    local trees = { blue = tree("blue"), green = tree("green") }
    -- what blue's working dir on the host holds (the restart above copied green's release there)
    local held = assert(proc.run(hosts.ssh(h, "cat " .. colours.blue.working_dir .. "/version"), { capture = true }))
      .stdout:match("%S+")
    local res = engine({ "--service", "web" }, { plan = "plans/rollback.lua" })
    assert.equal(0, res.exit_code, output(res))
    assert.equal("blue", live())
    assert.equal(held, running("blue"))
    assert.equal("ready", admin("blue"))
    assert.equal("drain", admin("green"))
    assert.equal("inactive", unit_get("green", "ActiveState"))
    assert.equal(trees.blue, tree("blue"))
    assert.equal(trees.green, tree("green"))
    assert.is_nil(host_state("run.journal"))
    assert.is_false(fs.exists(state_home .. "/rrengine/run.journal"))
  end)
end)

describe("a canary group with members on a remote host", function()
  -- c.1 (the canary) and c.2 on the test host, c.3 on this machine; HAProxy here in front of all
  local MEMBERS = { "c.1", "c.2", "c.3" }
  local ON_HOST = { ["c.1"] = true, ["c.2"] = true }
  local hs, h, cfg, dir, state_home, hxp, hp, m = nil, nil, nil, nil, nil, nil, nil, {}
  local releases = 0

  local function engine(args, opts) return run_engine(dir, cfg, state_home, args, opts) end

  local function manager_of(n)
    if ON_HOST[n] then return assert(systemd.remote(h.name, { user = true, ssh_config = cfg })) end
    return assert(systemd.user())
  end

  local function get(n, prop)
    local mg <close> = manager_of(n)
    return assert(mg:unit(m[n].unit)):get(prop)
  end

  local function running(n)
    local res = http.get(m[n].url, { timeout = 2 })
    return res and res.body:match("version=(%S+)")
  end

  -- sha256 of the member's unit file and of every file below its working dir (over ssh on the host)
  local function hashes(n)
    local cmd = "sha256sum " .. m[n].unit_path .. " && cd " .. m[n].wd
      .. " && find . -type f -print0 | sort -z | xargs -0 sha256sum"
    local res
    if ON_HOST[n] then
      res = assert(proc.run(hosts.ssh(h, cmd)))
    else
      res = assert(proc.run({ "sh", "-c", cmd }))
    end
    return res.stdout
  end

  local function host_state(rel)
    local res = proc.run(hosts.ssh(h, "cat", '"$XDG_STATE_HOME"/rrengine/' .. rel))
    return res and res.stdout or nil
  end

  local function release(name)
    releases = releases + 1
    local version = ("%s-%d"):format(name, releases)
    local d = ("%s/releases/%s"):format(dir, version)
    helpers.write(d .. "/version", version .. "\n")
    helpers.write(d .. "/new.txt", "new\n")
    return d, version
  end

  local function services_file(canary, path)
    local services = {}
    for i, n in ipairs(MEMBERS) do
      services[i] = { name = n, unit = m[n].unit, host = ON_HOST[n] and h.name or nil, group = "c", working_dir = m[n].wd,
        health = { url = m[n].url }, reload = false }
    end
    local tbl = { defaults = { health = { timeout = 5, retries = 1, interval = 0.2 }, stabilize = 0.3 },
      groups = { c = { max_unavailable = 1, drain_timeout = 5, canary = canary,
        balancer = { haproxy = hxp.socket, backend = "cny" } } },
      services = services }
    path = path or (dir .. "/services.lua")
    helpers.write(path, "return " .. platform.serialize(tbl) .. "\n")
    return path
  end

  local function deploy_args(d, extra)
    local args = { "--service", table.concat(MEMBERS, ","), "--deploy", "--deploy-path", d }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    return args
  end

  lazy_setup(function()
    hs = hosts.start(1)
    h = hs[1]
    cfg = h.ssh_config
    dir = assert(fs.mkdtemp("/tmp/rr-hosts-canary-"))
    state_home = dir .. "/state"
    local servers = {}
    for i, n in ipairs(MEMBERS) do
      local base = ON_HOST[n] and h.dir or dir
      local c = { port = units.free_port(), wd = base .. "/code/" .. n, unit = ("rrhcny-%s.service"):format(n:gsub("%.", "")) }
      c.url = ("http://127.0.0.1:%d/health"):format(c.port)
      helpers.write(c.wd .. "/version", "v1-" .. n .. "\n")
      helpers.write(c.wd .. "/app.lua", "return 'old code'\n")
      local opts = { exec = units.fixture_argv(c.port, { host = "127.0.0.1", version_file = c.wd .. "/version",
        delay_ms = 5 }) }
      if ON_HOST[n] then
        c.unit_path = h:write_unit(c.unit, opts)
      else
        c.unit_path = units.write(c.unit, opts)
      end
      m[n] = c
      servers[i] = { name = n, port = c.port }
    end
    for _, remote in ipairs({ true, false }) do
      local mg <close> = remote and assert(systemd.remote(h.name, { user = true, ssh_config = cfg })) or assert(systemd.user())
      assert(mg:daemon_reload())
      for _, n in ipairs(MEMBERS) do
        if (ON_HOST[n] or false) == remote then
          local u = assert(mg:unit(m[n].unit))
          assert(u:start("replace"))
          assert(health.check(u, { kind = "http", url = m[n].url, timeout = 10, retries = 3, interval = 0.2 }))
        end
      end
    end
    hxp = hx.start({ servers = servers, backend = "cny" })
    hp = assert(haproxy.new({ socket = hxp.socket, backend = "cny" }))
    services_file({ count = 1, soak = 1 })
  end)

  lazy_teardown(function()
    if hxp then hxp:stop() end
    if hs then hosts.stop(hs) end
    if m["c.3"] then
      local here <close> = assert(systemd.user())
      local u = here:unit(m["c.3"].unit)
      if u then u:stop("replace") end
      os.remove(m["c.3"].unit_path)
      here:daemon_reload()
    end
    if dir then fs.remove_tree(dir) end
  end)

  it("a failing canary is rolled back on its host, unit file and working dir as they were; the others untouched", function()
    local before, pids = {}, {}
    for _, n in ipairs(MEMBERS) do before[n], pids[n] = hashes(n), get(n, "MainPID") end
    local analysis = helpers.write(dir .. "/analysis.lua",
      "return function(info) return false, 'synthetic: canary ' .. info.canaries[1].name .. ' errs' end\n")
    local file = services_file({ count = 1, soak = 2, analysis = analysis }, dir .. "/failing.lua")
    local d = release("bad")
    local res = engine(deploy_args(d), { services = file })
    assert.equal(1, res.exit_code, output(res))
    assert.matches("synthetic: canary c%.1 errs", res.stdout .. res.stderr)
    -- the canary ran the release on the host, then went back: code, unit file, the old version served
    assert.equal("v1-c.1", running("c.1"))
    assert.equal(before["c.1"], hashes("c.1"))
    assert.are_not.equal(pids["c.1"], get("c.1", "MainPID"))
    assert.equal("ready", assert(hp:state("c.1")).admin)
    -- the others never touched
    for _, n in ipairs({ "c.2", "c.3" }) do
      assert.equal(before[n], hashes(n))
      assert.equal(pids[n], get(n, "MainPID"))
      assert.equal("v1-" .. n, running(n))
    end
    -- its records are the host's: the deploy undone (no pointer left), no journal anywhere
    assert.is_nil(host_state("deploys/c.1.inflight"))
    assert.is_truthy(host_state("snapshots/c.1/current"))
    assert.is_nil(host_state("run.journal"))
    assert.is_false(fs.exists(state_home .. "/rrengine/run.journal"))
    assert.is_false(fs.exists(state_home .. "/rrengine/snapshots/c.1"))
  end)

  it("--canary-only holds the canary on its host; plans/rollback.lua --group puts it back there", function()
    local before, pids = {}, {}
    for _, n in ipairs(MEMBERS) do before[n], pids[n] = hashes(n), get(n, "MainPID") end
    local d, version = release("good")
    local res = engine(deploy_args(d, { "--canary-only" }))
    assert.equal(0, res.exit_code, output(res))
    assert.equal(version, running("c.1"))
    for _, n in ipairs({ "c.2", "c.3" }) do
      assert.equal(pids[n], get(n, "MainPID"))
      assert.equal(before[n], hashes(n))
    end
    -- the held record is the run's (this machine); the deploy it names is on the host
    local held = cjson.decode((assert(fs.read(state_home .. "/rrengine/canary/c.json"))))
    assert.same({ "c.1" }, held.canaries)
    local record = held.deploys["c.1"]
    assert.is_truthy(record)
    assert.equal(1, record:find(h.env.XDG_STATE_HOME .. "/rrengine/runs/", 1, true), record)
    assert(proc.run(hosts.ssh(h, "test", "-f", record .. "/deploy.json")))

    local rb = engine({ "--group", "c" }, { plan = "plans/rollback.lua" })
    assert.equal(0, rb.exit_code, output(rb))
    assert.equal("v1-c.1", running("c.1"))
    assert.equal(before["c.1"], hashes("c.1"))
    assert.is_false(fs.exists(state_home .. "/rrengine/canary/c.json"))
    for _, n in ipairs({ "c.2", "c.3" }) do assert.equal(pids[n], get(n, "MainPID")) end
    assert.is_nil(host_state("run.journal"))
    assert.is_false(fs.exists(state_home .. "/rrengine/run.journal"))
    -- a second --group has nothing held: nothing touched
    local again = engine({ "--group", "c" }, { plan = "plans/rollback.lua" })
    assert.equal(0, again.exit_code, output(again))
    assert.matches("no held canary", again.stdout)
  end)
end)
