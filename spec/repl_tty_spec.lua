-- rrengine -i on a terminal: help(), Tab completion through readline, and the question before a
-- rollback. script(1) gives the engine a real pseudo-terminal; what is typed is written to it
-- at once (the terminal queues it; readline reads it key by key, Tab included) and the spec reads
-- what the terminal showed. Each session ends with os.exit(0) as its last line: script(1) sends
-- the end of input only once the terminal's input is empty, which a long line can delay.
local proc = require("rr.proc")
local helpers = require("spec.support.helpers")
local platform = require("spec.support.platform")

describe("the REPL on a terminal", function()
  local p
  setup(function()
    p = platform.new({ { name = "sso.redis" }, { name = "sso.api", depends = { "sso.redis" }, http = true },
      { name = "gateway", http = true } })
    p:start()
  end)
  teardown(function() p:teardown() end)

  -- The REPL in a pseudo-terminal, `typed` its keys; returns what the terminal showed, escape
  -- sequences removed and line ends as "\n".
  local function session(typed)
    local cmd = ("XDG_STATE_HOME=%s HOME=%s %s -i --user --services %s")
      :format(p.xdg_state, p.dir, helpers.engine, p.services_file)
    local res, err, _, r = proc.run({ "script", "-qec", cmd, "/dev/null" },
      { stdin = typed .. "os.exit(0)\n", timeout = 60, env = { RRENGINE_SERVICES = false, RRENGINE_USER = false } })
    res = res or r
    assert.is_truthy(res, err)
    assert.equal(0, res.exit_code, res.stdout)
    -- readline ends a line with "\r\n" and goes back to column 0 with "\r" before output
    -- (and rings the bell, "\a", when Tab has nothing to add)
    return (res.stdout:gsub("\a", ""):gsub("\27%[[%d;?]*[A-Za-z]", ""):gsub("\r\n", "\n"):gsub("\n\r", "\n"):gsub("\r", "\n"))
  end

  it("help() lists the helpers; help(\"rollback\") explains one", function()
    local out = session('help()\nhelp("rollback")\n')
    assert.matches("\nrr> help%(%)\nHelpers %(help%(\"name\"%) for one in detail; Tab completes", out)
    assert.matches("\n  restart%(name%[, opts%]%)%s+the whole flow[^\n]*\n%s+e%.g%. restart%(\"sso%.api\"%)\n", out)
    assert.matches("\nrollback%(name%[, opts%]%): [^\n]*\n", out)
    assert.matches('On a terminal it asks "roll back NAME%? %[y/N%]" first', out)
  end)

  it("Tab completes globals, fields, methods and service names inside a string", function()
    local out = session(table.concat({
      'print("sso.r\t)',               -- one service starts so: completed, and the string closed
      'print("gat\t, "sso.\t)',         -- two start "sso.": the common part, then the typed rest
      'stat\t)',                        -- a global function: with its "("
      'print(math.hu\t)',              -- a field
      'now = rr.no\t)',                -- ... a function field
      'mgr = require("rr.systemd").user()',
      'u = mgr:un\t"x.service")',       -- a method of a userdata (its metatable's __index)
      "print(('x'):up\t())",           -- (no name before ':': nothing offered)
      'help("resta\t)',                -- help's argument: the helpers' names
      "", }, "\n"))
    assert.matches("\nrr> print%(\"sso%.redis\"%)\nsso%.redis\n", out)
    assert.matches("\nrr> print%(\"gateway\", \"sso%.%)\n", out)
    assert.matches("\nrr> status%(%)\n[^\n]*SERVICE%s+UNIT%s+STATE", out)
    assert.matches("\nrr> print%(math%.huge%)\ninf", out)
    assert.matches("\nrr> now = rr%.now%(%)\n", out)
    assert.matches("\nrr> u = mgr:unit%(\"x%.service\"%)\n", out)
    assert.matches("\nrr> print%(%('x'%):up%(%)%)\n", out)
    assert.matches('\nrr> help%("restart"%)\nrestart%(name%[, opts%]%): ', out)
  end)

  it("Tab twice lists the service names that fit", function()
    local out = session('print("sso.\t\t")\n')
    assert.matches("\nsso%.api%s+sso%.redis%s*\n", out)
    assert.matches("\nrr> print%(\"sso%.\"%)\nsso%.\n", out)
  end)

  it("rollback(name) asks first: no rolls nothing back, y does; {yes = true} does not ask", function()
    -- a first run makes gateway's definition known good
    assert.is_true(p:run({ services = { "gateway" } }).success)
    local pid = p:props("gateway").MainPID
    local out = session('rollback("gateway")\nn\nrollback("gateway")\n\n')
    assert.matches('\nroll back gateway%? %[y/N%] n\nrollback of gateway not started: not confirmed '
      .. '%(rollback%("gateway", { yes = true }%) does not ask%)\n', out)
    -- Enter alone is the default: no
    assert.matches('\nroll back gateway%? %[y/N%] \nrollback of gateway not started: not confirmed', out)
    assert.equal(pid, p:props("gateway").MainPID, "gateway was touched")

    out = session('rollback("gateway")\ny\n')
    assert.matches("\nroll back gateway%? %[y/N%] y\n", out)
    assert.matches("\n[^\n]*rolled back: gateway %([%d.]+ m?s%)\n", out)
    assert.are_not.equal(pid, p:props("gateway").MainPID)
    pid = p:props("gateway").MainPID

    out = session('rollback("gateway", { yes = true })\n')
    assert.not_matches("roll back gateway%?", out)
    assert.matches("\n[^\n]*rolled back: gateway %([%d.]+ m?s%)\n", out)
    assert.are_not.equal(pid, p:props("gateway").MainPID)
  end)
end)
