-- bench/lib.lua: small helpers for bench/run.lua — statistics, the output table, a
-- section runner that never lets one failing figure stop the others (or the cleanup).
local lib = {}

-- A sorted copy of a list of numbers.
local function sorted(list)
  local s = {}
  for i, v in ipairs(list) do s[i] = v end
  table.sort(s)
  return s
end

function lib.median(list)
  local s = sorted(list)
  local n = #s
  if n == 0 then return nil end
  if n % 2 == 1 then return s[(n + 1) // 2] end
  return (s[n // 2] + s[n // 2 + 1]) / 2
end

function lib.min(list)
  local m
  for _, v in ipairs(list) do
    if m == nil or v < m then m = v end
  end
  return m
end

function lib.max(list)
  local m
  for _, v in ipairs(list) do
    if m == nil or v > m then m = v end
  end
  return m
end

function lib.mean(list)
  if #list == 0 then return nil end
  local sum = 0
  for _, v in ipairs(list) do sum = sum + v end
  return sum / #list
end

-- "12.34" with a sensible number of decimals for milliseconds; "-" for nil.
function lib.ms(v)
  if v == nil then return "-" end
  if v >= 1000 then return ("%.0f"):format(v) end
  if v >= 100 then return ("%.1f"):format(v) end
  return ("%.2f"):format(v)
end

-- "4.0x" (baseline / value), "-" when it cannot be told.
function lib.ratio(base, v)
  if base == nil or v == nil or v <= 0 then return "-" end
  local r = base / v
  if r >= 100 then return ("%.0fx"):format(r) end
  if r >= 10 then return ("%.1fx"):format(r) end
  return ("%.2fx"):format(r)
end

-- Left-justify / right-justify to width (plain ASCII text).
function lib.ljust(s, w)
  s = tostring(s)
  return s .. string.rep(" ", w - #s)
end

function lib.rjust(s, w)
  s = tostring(s)
  return string.rep(" ", w - #s) .. s
end

-- Print one table row: a label, then columns right-justified to the widths.
function lib.row(label, label_width, cols, widths)
  local out = { "  " .. lib.ljust(label, label_width) }
  for i, c in ipairs(cols) do
    out[#out + 1] = lib.rjust(c, widths[i] or 12)
  end
  print(table.concat(out, " "))
end

-- Flush stdout now (the bench prints progress while it measures).
function lib.flush()
  io.stdout:flush()
end

-- Progress on stderr: stdout keeps only the report.
function lib.progress(fmt, ...)
  io.stderr:write(("  .. " .. fmt .. "\n"):format(...))
  io.stderr:flush()
end

-- Run fn() and report a failure instead of raising; returns ok, err.
function lib.section(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  if not ok then
    print(("  !! %s failed: %s"):format(name, (tostring(err):match("^[^\n]*"))))
    lib.flush()
    io.stderr:write(tostring(err), "\n")
  end
  return ok, err
end

return lib
