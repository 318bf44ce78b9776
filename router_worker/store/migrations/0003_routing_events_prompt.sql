-- Prompt text of a decision, stored only for tenants that opted in (store_prompts: true);
-- `router-worker dataset export` builds training sets from it. NULL for everyone else.
ALTER TABLE routing_events ADD COLUMN IF NOT EXISTS prompt text;
