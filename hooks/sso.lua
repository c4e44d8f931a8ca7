-- Example team hook script for sso.api (named by `hooks = "hooks/sso.lua"` in services.lua).
-- Every hook runs as a task and may use any primitive (rr.http, rr.proc, ...).
local rr = require("rr")
local http = require("rr.http")

local hooks = {}

-- Refuse to restart during a migration window announced by a flag file (return false, reason).
function hooks.before_restart(svc)
  local f = io.open("/run/sso-maintenance", "r")
  if f then
    f:close()
    return false, "SSO maintenance window (/run/sso-maintenance exists)"
  end
  return true
end

-- After the restart, warm the token cache so the first users don't pay for it.
function hooks.after_restart(svc, info)
  if svc.health.url then
    local warm = svc.health.url:gsub("/health$", "/warmup")
    http.get(warm, { timeout = 5 })
  end
end

-- Tell the on-call channel about a rollback (see hooks/webhook.lua for a chat webhook).
function hooks.on_rollback(svc, info)
  io.stderr:write(("[sso hook] %s rolled back (%s)\n"):format(svc.name, info.reason))
end

return hooks
