-- Blue-green releases end to end: a template unit of the sandboxed user manager with two
-- instances (@blue, @green), each with its own working dir and port, behind a real HAProxy, a
-- release deployed by plans/rolling.lua as an operator runs it, under a real wrk load.
--   spec/support/run-specs ./rrengine spec/bluegreen_spec.lua
local fs = require("rr.fs")
local cjson = require("cjson")
local bgp = require("spec.support.bluegreen")
local helpers = require("spec.support.helpers")

local events_of = helpers.events_of

local function output(res)
  return ("exit %s\nstdout:\n%s\nstderr:\n%s"):format(tostring(res.exit_code), res.stdout or "", res.stderr or "")
end

local function at(evs, name, service)
  for i, ev in ipairs(evs) do
    if ev.event == name and (service == nil or ev.service == service) then return i end
  end
end

-- The events of the latest run of s.
local function last_run(s)
  return helpers.last_run(s.p)
end

describe("a blue-green service behind a real HAProxy, under a real wrk load", function()
  local s

  setup(function()
    s = bgp.new({ soak = 2 })
  end)

  teardown(function()
    if s then s:teardown() end
  end)

  it("a release goes to the idle colour, takes the traffic with no failed request, and the old colour stops", function()
    local dir, version = s:release("good")
    local blue_tree = bgp.tree(s.colours.blue.working_dir)
    assert.is_nil(s:live())
    assert.equal("inactive", s:active("green"))
    local load = s:load()
    local w = s:watch("blue")
    local res = s:cli({ "--service", "web", "--deploy", "--deploy-path", dir })
    w.stop()
    local r = load.stop()
    assert.equal(0, res.exit_code, output(res))
    assert.is_true(r.requests > 100, r.output)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)

    -- the new release runs in green, which serves; blue stopped, its code untouched
    assert.equal("green", s:live())
    assert.equal("active", s:active("green"))
    assert.equal(version, s:running("green"))
    assert.equal(version, s:on_disk("green"))
    assert.equal("inactive", s:active("blue"))
    assert.equal(blue_tree, bgp.tree(s.colours.blue.working_dir))
    assert.equal("ready", s:admin("green"))
    assert.equal("drain", s:admin("blue"))
    assert.is_true(w.seen.ready, "blue never served during the release")

    local evs = last_run(s)
    local start, switched, passed = at(evs, "BLUEGREEN_START"), at(evs, "BLUEGREEN_SWITCHED"), at(evs, "BLUEGREEN_PASSED")
    assert.is_truthy(start, output(res))
    assert.equal("blue", evs[start].live)
    assert.equal("green", evs[start].idle)
    assert.is_truthy(switched, output(res))
    assert.equal("blue", evs[switched].from)
    assert.equal("green", evs[switched].to)
    assert.is_truthy(passed, output(res))
    -- deployed and checked before the switch; the old colour stopped after the soak
    local post
    for i, ev in ipairs(evs) do
      if ev.event == "HEALTH_CHECK_PASSED" and ev.phase == "post" then post = i end
    end
    assert.is_true(at(evs, "DEPLOY_END") < post and post < switched)
    assert.equal(s.colours.green.working_dir, evs[at(evs, "DEPLOY_START")].target)
    local soak = at(evs, "BLUEGREEN_SOAK")
    assert.is_true(switched < soak)
    local stop
    for i, ev in ipairs(evs) do
      if ev.event == "UNIT_JOB_DONE" and ev.method == "stop" and ev.unit == s.colours.blue.unit then stop = i end
    end
    assert.is_truthy(stop, "blue was never stopped")
    assert.is_true(soak < stop and stop < passed)
    assert.is_nil(at(evs, "ROLLBACK_START"))
  end)

  it("the live colour survives the engine: the next release deploys into the other colour", function()
    assert.equal("green", s:live())
    local green_tree = bgp.tree(s.colours.green.working_dir)
    local dir, version = s:release("second")
    local res = s:cli({ "--service", "web", "--deploy", "--deploy-path", dir })
    assert.equal(0, res.exit_code, output(res))
    assert.equal("blue", s:live())
    assert.equal(version, s:running("blue"))
    assert.equal(version, s:on_disk("blue"))
    assert.equal("inactive", s:active("green"))
    assert.equal(green_tree, bgp.tree(s.colours.green.working_dir))
    assert.equal("ready", s:admin("blue"))
    assert.equal("drain", s:admin("green"))
  end)

  it("the dry run names the steps: the live colour, deploy and start of the idle one, switch, soak, stop", function()
    local dir = s:release("dry")
    local before = bgp.tree(s.colours.green.working_dir)
    local res = s:cli({ "--service", "web", "--dry-run", "--deploy", "--deploy-path", dir })
    assert.equal(0, res.exit_code, output(res))
    local out = res.stdout
    assert.matches("blue: [^\n]*active[^\n]*<%- live %(recorded%)", out)
    assert.matches("green: [^\n]*inactive[^\n]*%(idle%)", out)
    assert.matches("deploy: rsync %-a [^\n]* %-> " .. s.colours.green.working_dir:gsub("%p", "%%%0") .. "/ %(the idle colour green", out)
    assert.matches("start [^\n]*@green%.service", out)
    assert.matches("switch: web_green ready, web_blue drained", out)
    assert.matches("soak 2s with the traffic", out)
    assert.matches("stop the old colour [^\n]*@blue%.service", out)
    assert.equal(before, bgp.tree(s.colours.green.working_dir))
    assert.equal("blue", s:live())
  end)
end)
