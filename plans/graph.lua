-- rrengine plans/graph.lua [--services FILE] [--dot]: the restart order and the dependency
-- waves (what --parallel can run together); --dot prints Graphviz.
local cli = require("rr.cli")
local dag = require("rr.dag")

local spec = {
  usage = "rrengine plans/graph.lua [options]",
  summary = "The restart order and dependency waves of the services file.",
  examples = { { "rrengine plans/graph.lua --dot | dot -Tsvg > graph.svg", "draw the dependencies" } },
  options = {
    { name = "services", key = "services_file", type = "string", value = "FILE", default = "services.lua", help = "the services file" },
    { name = "dot", help = "Graphviz output" },
    { name = "help", short = "h", help = "show this help" },
  },
}
local opts, platform = cli.plan_start({ ... }, spec)
if opts.dot then
  print("digraph services {")
  for _, s in ipairs(platform.services) do
    print(("  %q;"):format(s.name))
    for _, d in ipairs(s.depends) do print(("  %q -> %q;"):format(d, s.name)) end
  end
  print("}")
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
