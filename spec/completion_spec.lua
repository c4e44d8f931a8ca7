-- completion/rrengine.bash (and zsh through bashcompinit), driven as the shell drives it:
-- bash sources the script, sets COMP_WORDS and COMP_CWORD, calls the function and we read
-- COMPREPLY. The words start with the real engine binary, which the completion runs to read the
-- plans' options and the services file.
local fs = require("rr.fs")
local proc = require("rr.proc")
local helpers = require("spec.support.helpers")

local root = fs.realpath(".")
local script = root .. "/completion/rrengine.bash"

describe("bash completion", function()
  local dir
  setup(function()
    dir = assert(fs.mkdtemp("/tmp/rr-completion-"))
    helpers.write(dir .. "/services.lua", [[
      return { services = {
        { name = "sso.postgresql", unit = "pg.service" },
        { name = "sso.api", unit = "api.service", depends = { "sso.postgresql" } },
        { name = "files.api", unit = "files.service" },
      } }]])
    helpers.write(dir .. "/other.lua", [[return { services = { { name = "ml.worker", unit = "w.service" } } }]])
    helpers.write(dir .. "/broken.lua", "return { services = { ")
    helpers.write(dir .. "/loop.lua", "while true do end")
    helpers.write(dir .. "/events.jsonl", "")
    assert(fs.mkdir_p(dir .. "/releases/v2", 493))
    assert(fs.mkdir_p(dir .. "/bin", 493))
    assert(fs.symlink(helpers.engine, dir .. "/bin/rrengine"))
  end)
  teardown(function() fs.remove_tree(dir) end)

  -- Completes `words` (the last one is being typed) in dir; returns COMPREPLY as a list and the
  -- shell's stderr. opts.env, opts.shell ("bash" or "zsh"), opts.preamble (shell code first).
  local function complete(words, opts)
    opts = opts or {}
    local driver
    if opts.shell == "zsh" then
      -- what zsh's _bash_complete does around a bash completion function
      driver = "autoload -U compinit && compinit -u -D; autoload -U +X bashcompinit && bashcompinit; "
        .. 'source "$0"; try() { emulate -L sh; setopt kshglob noshglob braceexpand; COMP_WORDS=("$@"); '
        .. 'COMP_CWORD=$(($# - 1)); COMPREPLY=(); _rrengine; printf "%s\\n" "${COMPREPLY[@]}"; }; try "$@"'
    else
      -- with a preamble, the preamble loads the completion (as bash-completion does)
      driver = (opts.preamble or 'source "$0"; ') .. 'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); '
        .. 'COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}; _rrengine; printf "%s\\n" "${COMPREPLY[@]}"'
    end
    local argv = opts.shell == "zsh" and { "zsh", "-f", "-c", driver, script }
      or { "bash", "--norc", "--noprofile", "-c", driver, script }
    for _, w in ipairs(words) do argv[#argv + 1] = w end
    local res, err, _, r = proc.run(argv, { cwd = opts.cwd or dir, env = opts.env, timeout = 30 })
    local out = res or r
    assert(type(out) == "table", err)
    assert.equal(0, out.exit_code, out.stderr)
    local list = {}
    for line in out.stdout:gmatch("[^\n]+") do list[#list + 1] = line end
    table.sort(list)
    return list, out.stderr
  end

  it("offers the plans beside the engine's library from any directory, and the engine's options", function()
    local list, stderr = complete({ helpers.engine, "" })
    assert.same({ "plans/graph.lua", "plans/rollback.lua", "plans/rolling.lua", "plans/status.lua", "plans/timeline.lua" }, list)
    assert.equal("", stderr)
    assert.same({ "plans/rollback.lua", "plans/rolling.lua" }, (complete({ helpers.engine, "plans/ro" })))
    assert.same({ "--debug", "--help", "--version", "-e", "-h", "-i" }, (complete({ helpers.engine, "-" })))
    -- a plan of this directory's own plans/ too
    helpers.write(dir .. "/plans/mine.lua", "print('mine')")
    assert.same({ "plans/mine.lua" }, (complete({ helpers.engine, "plans/m" })))
    assert(fs.remove_tree(dir .. "/plans"))
  end)

  it("finds rrengine on PATH when the command is typed bare", function()
    local list = complete({ "rrengine", "plans/st" }, { env = { PATH = dir .. "/bin:/usr/bin:/bin" } })
    assert.same({ "plans/status.lua" }, list)
    assert.same({}, (complete({ "rrengine", "plans/st" }, { env = { PATH = "/usr/bin:/bin" } })))
  end)

  it("offers a plan's own options, read from its --help", function()
    local list = complete({ helpers.engine, "plans/rolling.lua", "--" })
    -- every option the plan's usage lists, and nothing else
    local res = assert(proc.run({ helpers.engine, "plans/rolling.lua", "--help" }))
    local expected = {}
    for name in res.stdout:gmatch("\n  %-?%a?,? ?(%-%-[%w-]+)") do expected[#expected + 1] = name end
    table.sort(expected)
    assert.is_true(#expected >= 15)
    assert.same(expected, list)
    assert.same({ "--dry-run" }, (complete({ helpers.engine, "plans/rolling.lua", "--dr" })))
    assert.same({ "--list" }, (complete({ helpers.engine, "plans/timeline.lua", "--li" })))
    assert.same({ "--dot" }, (complete({ helpers.engine, "plans/graph.lua", "--do" })))
    assert.same({ "--help", "--list", "--output", "--run", "--user", "--width", "-h", "-o" },
      (complete({ helpers.engine, "plans/timeline.lua", "-" })))
    assert.same({ "./x.lua" }, (complete({ helpers.engine, "./x" }, {
      preamble = 'source "$0"; touch x.lua; ' })))
  end)

  it("completes service names from ./services.lua, a comma list item by item", function()
    assert.same({ "files.api", "sso.api", "sso.postgresql" }, (complete({ helpers.engine, "plans/rolling.lua", "--service", "" })))
    assert.same({ "sso.api", "sso.postgresql" }, (complete({ helpers.engine, "plans/rolling.lua", "--service", "sso." })))
    assert.same({ "sso.api,files.api" }, (complete({ helpers.engine, "plans/rolling.lua", "--service", "sso.api,f" })))
    assert.same({ "sso.api" }, (complete({ helpers.engine, "plans/rollback.lua", "--service", "sso.a" })))
    -- --service=NAME: bash splits the word at "="
    assert.same({ "sso.api", "sso.postgresql" }, (complete({ helpers.engine, "plans/rolling.lua", "--service", "=", "s" })))
    assert.same({ "files.api", "sso.api", "sso.postgresql" }, (complete({ helpers.engine, "plans/rolling.lua", "--service", "=" })))
  end)

  it("reads the services file named on the line (before or after), with ~ and --services=FILE", function()
    assert.same({ "ml.worker" }, (complete({ helpers.engine, "plans/rolling.lua", "--services", dir .. "/other.lua", "--service", "" })))
    assert.same({ "ml.worker" }, (complete({ helpers.engine, "plans/rolling.lua", "--services", "=", "other.lua", "--service", "" })))
    assert.same({ "ml.worker" }, (complete({ helpers.engine, "plans/rolling.lua", "--services=other.lua", "--service", "m" })))
    assert.same({ "ml.worker" }, (complete({ helpers.engine, "plans/rolling.lua", "--services", "~/other.lua", "--service", "" },
      { env = { HOME = dir } })))
  end)

  it("is silent and empty on a services file that is missing, broken or never ends", function()
    for _, file in ipairs({ "missing.lua", "broken.lua", "loop.lua" }) do
      local list, stderr = complete({ helpers.engine, "plans/rolling.lua", "--services", file, "--service", "" })
      assert.same({}, list, file)
      assert.equal("", stderr, file)
    end
    local list, stderr = complete({ helpers.engine, "plans/rolling.lua", "--service", "" }, { cwd = "/" })
    assert.same({}, list)
    assert.equal("", stderr)
  end)

  it("with no services file here, completes from the one the plan would read (--user: the user's own)", function()
    local cfg = dir .. "/cfg"
    helpers.write(cfg .. "/rrengine/services.lua", [[return { services = { { name = "gpu.infer", unit = "g.service" } } }]])
    local env = { XDG_CONFIG_HOME = cfg, HOME = dir, PATH = os.getenv("PATH") }
    assert.same({ "gpu.infer" },
      (complete({ helpers.engine, "plans/rolling.lua", "--user", "--service", "" }, { cwd = dir .. "/releases", env = env })))
    -- ./services.lua comes first, as for the plan
    assert.same({ "files.api" },
      (complete({ helpers.engine, "plans/rolling.lua", "--user", "--service", "f" }, { env = env })))
  end)

  it("completes files and directories where an option wants one", function()
    assert.same({ "services.lua" }, (complete({ helpers.engine, "plans/rolling.lua", "--services", "serv" })))
    assert.same({ "releases/v2" }, (complete({ helpers.engine, "plans/rolling.lua", "--deploy-path", "releases/" })))
    assert.same({ "events.jsonl" }, (complete({ helpers.engine, "plans/timeline.lua", "ev" })))
    assert.same({ "events.jsonl" }, (complete({ helpers.engine, "plans/timeline.lua", "-o", "ev" })))
    -- a number or an id is not completed with files
    assert.same({}, (complete({ helpers.engine, "plans/rolling.lua", "--parallel", "" })))
    assert.same({}, (complete({ helpers.engine, "-e", "" })))
  end)

  it("the REPL's options after -i, and its services file", function()
    assert.same({ "--services" }, (complete({ helpers.engine, "-i", "--s" })))
    assert.same({ "--debug", "--services", "--user" }, (complete({ helpers.engine, "-i", "--" })))
    assert.same({ "other.lua" }, (complete({ helpers.engine, "-i", "--services", "oth" })))
  end)

  it("loads through bash-completion's own loader from an installed completions directory", function()
    local share = dir .. "/share"
    assert(fs.mkdir_p(share .. "/bash-completion/completions", 493))
    assert(fs.symlink(script, share .. "/bash-completion/completions/rrengine"))
    -- bash-completion loads a command's completion on first use, from XDG_DATA_DIRS
    local list = complete({ helpers.engine, "plans/rolling.lua", "--service", "files" }, {
      env = { XDG_DATA_DIRS = share, BASH_COMPLETION_USER_DIR = dir .. "/none" },
      preamble = '. /usr/share/bash-completion/bash_completion; __load_completion rrengine || exit 3; ',
    })
    assert.same({ "files.api" }, list)
  end)

  it("zsh completes the same through bashcompinit", function()
    assert.same({ "sso.api", "sso.postgresql" },
      (complete({ helpers.engine, "plans/rolling.lua", "--service", "sso" }, { shell = "zsh" })))
    assert.same({ "--service=files.api" },
      (complete({ helpers.engine, "plans/rolling.lua", "--service=f" }, { shell = "zsh" })))
    assert.same({ "--dry-run" }, (complete({ helpers.engine, "plans/rolling.lua", "--dr" }, { shell = "zsh" })))
  end)
end)
