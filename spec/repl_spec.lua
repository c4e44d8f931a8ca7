-- rrengine -i: the emergency REPL with the services preloaded.
local proc = require("rr.proc")
local platform = require("spec.support.platform")

local engine = os.getenv("RR_ENGINE") or arg[-1]

describe("the REPL", function()
  local p
  setup(function()
    p = platform.new({ { name = "db" }, { name = "api", depends = { "db" }, http = true } })
    p:start()
  end)
  teardown(function() p:teardown() end)

  local function repl(input)
    local res, err, r = proc.run({ engine, "-i" }, { stdin = input, timeout = 60,
      env = { RRENGINE_SERVICES = p.services_file, RRENGINE_USER = "1", XDG_STATE_HOME = p.xdg_state,
        HOME = p.dir } })
    return res or r or error(err)
  end

  it("loads the services and shows the status of every one", function()
    local res = repl("status()\n")
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("2 services from", res.stdout)
    assert.matches("db%s+" .. p.by_name.db.unit:gsub("%-", "%%-") .. "%s+active", res.stdout)
    assert.matches("api%s+%S+%s+active%s+running%s+%d+%s+healthy", res.stdout)
  end)

  it("restarts one service through the same flow, and reports a bad name without dying", function()
    local pid = p:props("api").MainPID
    local res = repl('restart("api")\nrestart("nosuch")\nprint("still here")\n')
    assert.matches("ok", res.stdout)
    assert.matches('unknown service "nosuch"', res.stderr)
    assert.matches("still here", res.stdout)
    assert.are_not.equal(pid, p:props("api").MainPID)
  end)
end)
