-- plans/rollback.lua as an operator runs it (the real binary, --user, the sandboxed manager):
-- it refuses when there is nothing to restore, restores the known-good definition, and undoes
-- the deploy a run left unfinished (deploys/<svc>.inflight), the last one, or one named with
-- --deploy-record DIR — byte-identical, leaving what the service wrote alone.
local fs = require("rr.fs")
local deploy = require("rr.deploy")
local state = require("rr.state")
local http = require("rr.http")
local helpers = require("spec.support.helpers")
local platform = require("spec.support.platform")

local write = helpers.write

-- The working dir's code: rel -> "type mode sha256", without what the service writes itself
-- (service.log) and the fixture's control file.
local function code_tree(dir)
  local out = {}
  local function walk(rel)
    local path = rel == "" and dir or dir .. "/" .. rel
    for _, name in ipairs(assert(fs.list(path))) do
      local r = rel == "" and name or rel .. "/" .. name
      if r ~= "service.log" and not r:match("%.control$") then
        local p = dir .. "/" .. r
        local st = assert(fs.stat(p))
        out[r] = ("%s %04o %s"):format(st.type, st.mode & 4095, st.type == "file" and assert(fs.sha256(p)) or "")
        if st.type == "dir" then walk(r) end
      end
    end
  end
  walk("")
  return out
end

local edit = helpers.edit

local PLAN = { plan = "plans/rollback.lua", timeout = 60 }

describe("plans/rollback.lua", function()
  local p, api
  before_each(function()
    p = platform.new({ { name = "api", http = true, code = true } })
    p:start()
    api = p.by_name.api
  end)
  after_each(function() p:teardown() end)

  -- A release in its own dir (what --deploy-path names), deployed into api's working dir as
  -- the flow does, with its record under the state root.
  local function release(name, files)
    local src = p.dir .. "/releases/" .. name
    for rel, data in pairs(files) do write(src .. "/" .. rel, data) end
    return assert(deploy.apply{ source = src, target = api.working_dir, checksum = true,
      state_dir = ("%s/runs/%s/api"):format(p.state_root, name) })
  end

  local function served_version()
    local res = http.get(api.url, { timeout = 2 })
    return res and res.body and res.body:match("version=(%S+)") or nil
  end

  it("refuses with nothing to restore: exit 1, the service untouched", function()
    local pid = p:props("api").MainPID
    local res = p:cli({ "--service", "api" }, PLAN)
    assert.equal(1, res.exit_code, res.stdout .. res.stderr)
    assert.matches("rrengine: nothing to restore for api: no known%-good snapshot", res.stderr)
    assert.matches("no code deploy to undo", res.stderr)
    assert.matches("the service was not touched", res.stderr)
    assert.equal(pid, p:props("api").MainPID)
    assert.equal("active", p:props("api").ActiveState)
    assert.is_nil(p:last_event("ROLLBACK_START", "api"))
    -- --no-code without a known-good snapshot: the same
    res = p:cli({ "--service", "api", "--no-code" }, PLAN)
    assert.equal(1, res.exit_code)
    assert.matches("%-%-no%-code leaves the code as it is", res.stderr)
    assert.equal(pid, p:props("api").MainPID)
  end)

  it("restores a hand-edited unit file from the known-good snapshot", function()
    assert.is_true(p:run().success) -- makes the definition known good
    local path = api.unit_path
    local good = fs.read(path)
    edit(path, "%[Service%]", "[Service]\nEnvironment=HAND_EDIT=1")
    local pid = p:props("api").MainPID
    local res = p:cli({ "--service", "api" }, PLAN)
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("definition: the known%-good snapshot of run", res.stdout)
    assert.equal(good, fs.read(path))
    local props = p:props("api")
    assert.equal("active", props.ActiveState)
    assert.is_false(props.NeedDaemonReload)
    assert.are_not.equal(pid, props.MainPID)
    assert.same({ path }, p:last_event("DEFINITION_RESTORED", "api").restored)
    assert.is_truthy(p:last_event("ROLLBACK_SUCCESS", "api"))
  end)

  it("leaves shared drop-ins (service.d/, a name prefix's) alone and removes the unit's own", function()
    local units = require("spec.support.units")
    assert.is_true(p:run().success) -- known good: no drop-ins at all
    -- after it: one drop-in for every service of the manager, one for every unit named
    -- "<prefix>...", one for this unit only
    local global = units.dir() .. "/service.d/50-rr-all.conf"
    local prefix = units.dir() .. "/" .. p.prefix .. ".service.d/50-prefix.conf"
    finally(function()
      fs.remove_tree(units.dir() .. "/service.d")
      fs.remove_tree(units.dir() .. "/" .. p.prefix .. ".service.d")
      platform.manager():daemon_reload()
    end)
    write(global, "[Service]\nEnvironment=RR_SHARED_ALL=1\n")
    write(prefix, "[Service]\nEnvironment=RR_SHARED_PREFIX=1\n")
    local own = units.dropin(api.unit, "90-own", { Service = { "Environment=RR_OWN=1" } })
    assert(platform.manager():daemon_reload())
    local listed = {}
    for _, path in ipairs(p:props("api").DropInPaths) do listed[path] = true end
    assert.is_true(listed[global] and listed[prefix] and listed[own], "systemd lists all three")
    local shared_before = { fs.sha256(global), fs.sha256(prefix) }

    local res = p:cli({ "--service", "api" }, PLAN)
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.is_false(fs.exists(own))
    assert.same(shared_before, { fs.sha256(global), fs.sha256(prefix) })
    local env = table.concat(p:props("api").Environment or {}, " ")
    assert.matches("RR_SHARED_ALL=1", env)
    assert.matches("RR_SHARED_PREFIX=1", env)
    assert.is_nil(env:find("RR_OWN=1", 1, true))
    assert.same({ own }, p:last_event("DEFINITION_RESTORED", "api").removed)
  end)

  it("undoes the unfinished deploy an .inflight pointer names, not the .last one", function()
    local wd = api.working_dir
    local last = release("run-a", { version = "v2\n", ["app.lua"] = "return 'release a'\n" })
    assert(state.write_pointer(p.state_root, "api", "last", last.state_dir))
    local after_last = code_tree(wd)
    -- the next run died during its deploy: a new file, a replaced one, a new directory
    local inflight = release("run-b", { version = "v3\n", ["lib/util.lua"] = "return 3\n",
      ["lib/new.lua"] = "return 'new'\n", ["assets/logo.txt"] = "logo\n" })
    assert(state.write_pointer(p.state_root, "api", "inflight", inflight.state_dir))
    assert.are_not.same(after_last, code_tree(wd))
    local log_before = assert(fs.read(wd .. "/service.log"))

    local res = p:cli({ "--service", "api" }, PLAN)
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    -- it says which record it undoes: path, where from, state, time
    assert.matches("deploy record " .. inflight.state_dir:gsub("%p", "%%%0") .. " %(from [^)]*api%.inflight",
      res.stdout)
    assert.matches("state applied, created %d%d%d%d%-", res.stdout)
    assert.same(after_last, code_tree(wd))
    assert.equal("v2", served_version()) -- restarted on the code of the last good deploy
    -- the service's own file was left alone (it appended its start line)
    assert.equal(log_before, fs.read(wd .. "/service.log"):sub(1, #log_before))
    assert.is_nil(state.read_pointer(p.state_root, "api", "inflight"))
    assert.equal(last.state_dir, state.read_pointer(p.state_root, "api", "last"))
    assert.equal("undone", assert(deploy.load(inflight.state_dir)).state)
    assert.equal("applied", assert(deploy.load(last.state_dir)).state)
    assert.is_truthy(p:last_event("DEPLOY_UNDONE", "api"))

    -- next time, with no .inflight: the .last deploy is the one undone, and its pointer goes
    res = p:cli({ "--service", "api" }, PLAN)
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.is_truthy(res.stdout:find("api.last — the last successful deploy", 1, true), res.stdout)
    assert.equal("v1", served_version())
    assert.equal("return 'old code'\n", fs.read(wd .. "/app.lua"))
    assert.is_nil(state.read_pointer(p.state_root, "api", "last"))
  end)

  it("never falls back to the .last deploy while an .inflight pointer is there", function()
    assert.is_true(p:run().success) -- known good
    local wd = api.working_dir
    local last = release("run-a", { version = "v2\n" })
    assert(state.write_pointer(p.state_root, "api", "last", last.state_dir))
    local code = code_tree(wd)
    -- the next run was killed after writing its pointer, before its deploy changed anything
    assert(state.write_pointer(p.state_root, "api", "inflight", p.state_root .. "/runs/run-b/api"))
    local res = p:cli({ "--service", "api" }, PLAN)
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("never started changing files; the code is left as it is", res.stdout)
    assert.same(code, code_tree(wd))
    assert.equal("applied", assert(deploy.load(last.state_dir)).state)
    assert.is_nil(state.read_pointer(p.state_root, "api", "inflight"))
    assert.equal(last.state_dir, state.read_pointer(p.state_root, "api", "last"))

    -- the same with an .inflight record its run's own rollback already undid
    local undone = release("run-c", { version = "v3\n" })
    assert(deploy.undo(undone))
    assert(state.write_pointer(p.state_root, "api", "inflight", undone.state_dir))
    res = p:cli({ "--service", "api" }, PLAN)
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("already undone at [^;]*; the code is left as it is", res.stdout)
    assert.same(code, code_tree(wd))
    assert.is_nil(state.read_pointer(p.state_root, "api", "inflight"))
    assert.equal("applied", assert(deploy.load(last.state_dir)).state)

    -- and then .last: undone, with a note that a later deploy was undone already
    res = p:cli({ "--service", "api" }, PLAN)
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("note: a later deploy %(.*run%-c/api", res.stdout)
    assert.equal("undone", assert(deploy.load(last.state_dir)).state)
    assert.equal("v1", served_version())
  end)

  it("undoes the deploy --deploy-record names, and removes a pointer that named it", function()
    local wd = api.working_dir
    local before = code_tree(wd)
    local record = release("run-c", { version = "v9\n", ["app.lua"] = "return 'c'\n", ["extra.lua"] = "x\n" })
    assert(state.write_pointer(p.state_root, "api", "last", record.state_dir .. "/"))
    -- an unfinished deploy of another run: its pointer must survive the undo of this one
    local unfinished = p.state_root .. "/runs/run-d/api"
    assert(state.write_pointer(p.state_root, "api", "inflight", unfinished))
    -- restart onto the new code, as a finished run would have
    assert(p:unit("api"):restart("replace"))
    local deadline = require("rr").now() + 10
    while served_version() ~= "v9" and require("rr").now() < deadline do require("rr").sleep(0.05) end
    assert.equal("v9", served_version())

    local res = p:cli({ "--service", "api", "--deploy-record", record.state_dir }, PLAN)
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("%(from %-%-deploy%-record", res.stdout)
    assert.same(before, code_tree(wd))
    assert.equal("v1", served_version())
    assert.equal("undone", assert(deploy.load(record.state_dir)).state)
    assert.is_nil(state.read_pointer(p.state_root, "api", "last"))
    assert.equal(unfinished, state.read_pointer(p.state_root, "api", "inflight"))
  end)

  it("refuses a record it cannot read (exit 1) and one for another working dir (exit 2), touching nothing", function()
    local pid = p:props("api").MainPID
    write(p.state_root .. "/runs/torn/api/deploy.json", "{ \"version\": 1, ")
    assert(state.write_pointer(p.state_root, "api", "inflight", p.state_root .. "/runs/torn/api"))
    local res = p:cli({ "--service", "api" }, PLAN)
    assert.equal(1, res.exit_code, res.stdout .. res.stderr)
    assert.matches("cannot read the deploy record .*runs/torn/api %(from .*api%.inflight%)", res.stderr)
    assert.matches("remove that pointer or use %-%-no%-code", res.stderr)

    -- an engine killed between the pointer and apply's record: nothing changed, nothing to undo
    assert(state.write_pointer(p.state_root, "api", "inflight", p.state_root .. "/runs/never/api"))
    res = p:cli({ "--service", "api" }, PLAN)
    assert.equal(1, res.exit_code, res.stdout .. res.stderr)
    assert.matches("holds no deploy record: that deploy never started changing files", res.stdout)
    assert.matches("nothing to restore for api", res.stderr)
    assert.is_truthy(state.read_pointer(p.state_root, "api", "inflight")) -- refused: nothing touched

    -- a record of a deploy somewhere else
    local other = p.dir .. "/other-code"
    assert(fs.mkdir_p(other, 493))
    write(p.dir .. "/releases/other/x", "x\n")
    local foreign = assert(deploy.apply{ source = p.dir .. "/releases/other", target = other,
      state_dir = p.state_root .. "/runs/other/x" })
    res = p:cli({ "--service", "api", "--deploy-record", foreign.state_dir }, PLAN)
    assert.equal(2, res.exit_code, res.stdout .. res.stderr)
    assert.matches("is a deploy into .*other%-code, not into api's working_dir", res.stderr)
    assert.equal("applied", assert(deploy.load(foreign.state_dir)).state)

    res = p:cli({ "--service", "api", "--deploy-record", foreign.state_dir, "--no-code" }, PLAN)
    assert.equal(2, res.exit_code)
    assert.matches("contradict", res.stderr)
    assert.equal(pid, p:props("api").MainPID)
  end)

  it("lists exit code 1 and shows examples first in --help", function()
    local res = p:cli({ "--help" }, PLAN)
    assert.equal(0, res.exit_code)
    local examples = res.stdout:find("Examples:", 1, true)
    local options = res.stdout:find("Options:", 1, true)
    assert.is_truthy(examples and options and examples < options, res.stdout)
    assert.matches("%-%-deploy%-record DIR", res.stdout)
    assert.matches("\n  1 +nothing was touched: another run holds the lock, the deploy record", res.stdout)
  end)
end)
