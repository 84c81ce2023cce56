-- The class of each rejected update (the `reason` label of the Prometheus counter: identity,
-- stale_round, layout, ...), so the dashboard counts rejections by class. NULL for rows from
-- before this column.
ALTER TABLE rejections ADD COLUMN kind TEXT;
