-- rrengine plans/graph.lua [--services FILE | --user] [--dot | --svg]: the restart order and the dependency
-- waves (what --parallel can run together); --dot prints Graphviz, --svg runs Graphviz's dot.
local cli = require("rr.cli")
local dag = require("rr.dag")

local spec = {
  usage = "rrengine plans/graph.lua [options]",
  summary = "The restart order and dependency waves of the services file.",
  examples = { { "rrengine plans/graph.lua --svg > graph.svg", "draw the dependencies (needs Graphviz's dot)" },
                { "rrengine plans/graph.lua --dot", "the dependencies as a Graphviz digraph" } },
  options = {
    { name = "services", key = "services_file", type = "string", value = "FILE",
      help = "the services file (default: ./services.lua, else /etc/rrengine/services.lua; with --user "
        .. "$XDG_CONFIG_HOME/rrengine/services.lua)" },
    { name = "user", help = "look for the services file of your user manager (see --services)" },
    { name = "dot", help = "Graphviz output" },
    { name = "svg", help = "an SVG picture of the dependencies, drawn by Graphviz's dot (package graphviz)" },
    { name = "help", short = "h", help = "show this help" },
  },
}
local opts, platform = cli.plan_start({ ... }, spec, {
  check = function(o)
    if o.dot and o.svg then return nil, "--dot and --svg: choose one" end
    return true
  end,
})

-- The dependency graph in Graphviz's language; a dependency points at what waits for it.
local function digraph()
  local lines = { "digraph services {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fillcolor="#e3f2fd", fontname="sans-serif"];' }
  for _, s in ipairs(platform.services) do
    lines[#lines + 1] = ("  %q [tooltip=%q];"):format(s.name, s.unit)
    for _, d in ipairs(s.depends) do lines[#lines + 1] = ("  %q -> %q;"):format(d, s.name) end
  end
  lines[#lines + 1] = "}"
  return table.concat(lines, "\n") .. "\n"
end

if opts.dot then
  io.write(digraph())
  os.exit(0)
end
if opts.svg then
  -- dot reads the graph on stdin: no temporary file, no shell.
  local res, err, code, r = require("rr.proc").run({ "dot", "-Tsvg" }, { stdin = digraph(), timeout = 60 })
  if not res then
    if code == "ENOENT" then err = "--svg needs Graphviz's dot, which is not installed (apt-get install graphviz)" end
    io.stderr:write("rrengine: ", err, r and r.stderr ~= "" and (": " .. r.stderr:gsub("%s+$", "")) or "", "\n")
    os.exit(1)
  end
  io.write(res.stdout)
  os.exit(0)
end
for i, s in ipairs(assert(dag.order(platform.services))) do
  print(("%2d. %-28s %s%s"):format(i, s.name, s.unit, #s.depends > 0 and ("  after " .. table.concat(s.depends, ", ")) or ""))
end
print("")
for i, wave in ipairs(dag.layers(platform.services)) do
  local names = {}
  for _, s in ipairs(wave) do names[#names + 1] = s.name end
  print(("wave %d: %s"):format(i, table.concat(names, ", ")))
end
