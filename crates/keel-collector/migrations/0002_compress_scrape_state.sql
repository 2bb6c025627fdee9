-- The delta base (a few hundred kB at 5,000 statements) and the latest samples are rewritten at
-- every scrape; pglz spent ~10 ms of a 35 ms cycle compressing them, lz4 ~1.5 ms. Servers built
-- without lz4 store them uncompressed instead (still cheaper than pglz).
DO $$
BEGIN
    EXECUTE 'ALTER TABLE scrape_state ALTER COLUMN snapshot SET COMPRESSION lz4, ALTER COLUMN latest SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    EXECUTE 'ALTER TABLE scrape_state ALTER COLUMN snapshot SET STORAGE EXTERNAL';
END
$$;
