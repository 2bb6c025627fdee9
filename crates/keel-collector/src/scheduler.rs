//! The scrape loop: claim due jobs, scrape each target within its timeout, write the result.
//!
//! A replica claims only as many jobs as it has free scrape slots, so claimed work never waits
//! behind a slow target; each target's scrape runs in its own task under its own timeout. A
//! replica keeps one connection per target between cycles (dropped on error, on timeout, and
//! when the target's registry version changes) and the target's last snapshot, used as the
//! delta base as long as no other replica wrote a newer one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::Utc;
use keel_bus::{Outbox, SubjectRoot};
use keel_target::{Connector, TargetError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::CollectorConfig;
use crate::catalog::{self as c, Sample};
use crate::error::CollectorError;
use crate::registry::RegistryClient;
use crate::scrape::{self, postgres::PgLimits};
use crate::statements::{self, Deltas, Snapshot};
use crate::store::{self, Claimed, Engine, Outcome, Written};

/// How long a query id whose text was asked for and not given (evicted between the two reads,
/// or its text lost from the server's text file) is not asked for again: reading texts reads
/// the server's whole text file (hundreds of MB on busy servers), so only ids never asked for
/// trigger a read. (Another role's statements, hidden without pg_read_all_stats, have no query
/// id to ask with.)
const TEXT_RETRY: Duration = Duration::from_secs(300);

/// An open session to a target.
enum Session {
    Postgres(sqlx::PgConnection),
    Redis(redis::aio::MultiplexedConnection),
}

/// What a replica remembers about a target between its scrapes.
#[derive(Default)]
struct TargetCache {
    /// The clear URL and the registry version it belongs to.
    url: Option<(SecretString, i64)>,
    session: Option<Session>,
    known_texts: Option<HashSet<i64>>,
    /// Ids whose text was asked for and not given, and when (see [`TEXT_RETRY`]).
    texts_unresolved: HashMap<i64, Instant>,
    /// The delta base: the `scrape_seq` it was written at, with what was written.
    base: Option<(i64, store::Base)>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    engine: &'static str,
    outcome: &'static str,
}

/// The collector's own metrics.
#[derive(Debug, Clone)]
pub(crate) struct WorkerMetrics {
    scrapes: Family<OutcomeLabels, Counter>,
    duration: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
}

impl WorkerMetrics {
    pub(crate) fn register(metrics: &keel_server::Metrics) -> Self {
        fn histogram() -> Histogram {
            // 1 ms to about 33 s: from a quiet Redis to a target at its timeout.
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        }
        let scrapes = Family::<OutcomeLabels, Counter>::default();
        let duration =
            Family::<OutcomeLabels, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        metrics.register(
            "keel_collector_scrapes",
            "Scrapes this replica made, by engine and outcome (ok, down, timeout, denied, gone, stale, error)",
            scrapes.clone(),
        );
        metrics.with_registry(|r| {
            r.register_with_unit(
                "keel_collector_scrape_duration",
                "Time from claiming a job to its result being written, by engine and outcome",
                prometheus_client::registry::Unit::Seconds,
                duration.clone(),
            );
        });
        Self { scrapes, duration }
    }

    fn record(&self, engine: Engine, outcome: &'static str, took: Duration) {
        let labels = OutcomeLabels {
            engine: engine.as_str(),
            outcome,
        };
        self.scrapes.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }
}

/// Scrapes targets: the loop over due jobs, and one target on demand.
#[derive(Clone)]
pub(crate) struct Scraper {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scraper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraper").finish_non_exhaustive()
    }
}

struct Inner {
    pool: PgPool,
    registry: RegistryClient,
    connector: Connector,
    config: CollectorConfig,
    outbox: Outbox,
    subjects: SubjectRoot,
    metrics: WorkerMetrics,
    cache: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<TargetCache>>>>,
}

/// The result of one scrape.
#[derive(Debug)]
pub(crate) struct Scraped {
    pub(crate) written: Written,
    pub(crate) outcome: Outcome,
}

impl Scraper {
    pub(crate) fn new(
        pool: PgPool,
        registry: RegistryClient,
        connector: Connector,
        config: CollectorConfig,
        outbox: Outbox,
        subjects: SubjectRoot,
        metrics: WorkerMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                registry,
                connector,
                config,
                outbox,
                subjects,
                metrics,
                cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Claims and scrapes due jobs until `stop` is cancelled.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(
            self.inner.config.max_concurrent_scrapes.max(1),
        ));
        let mut running = JoinSet::new();
        let poll = self.inner.config.poll_interval;
        loop {
            while running.try_join_next().is_some() {}
            let free = slots.available_permits();
            let mut claimed = 0;
            if free > 0 {
                match store::claim_due(&self.inner.pool, free as i64).await {
                    Ok(jobs) => {
                        claimed = jobs.len();
                        for job in jobs {
                            let Ok(permit) = slots.clone().acquire_owned().await else {
                                return;
                            };
                            let scraper = self.clone();
                            running.spawn(async move {
                                let _ = scraper.scrape(job).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(error) => tracing::warn!(%error, "claiming scrape jobs failed; retrying"),
                }
            }
            // A full claim means more may be due: claim again as soon as a slot frees up.
            let wait = if claimed > 0 && claimed == free {
                Duration::from_millis(5)
            } else {
                match store::next_due(&self.inner.pool).await {
                    Ok(Some(at)) => (at - Utc::now())
                        .to_std()
                        .unwrap_or_default()
                        .clamp(Duration::from_millis(5), poll),
                    _ => poll,
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        // Scrapes in flight end at their timeout; their results are worth keeping.
        while running.join_next().await.is_some() {}
    }

    fn cache_of(&self, id: Uuid) -> Arc<tokio::sync::Mutex<TargetCache>> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id)
            .or_default()
            .clone()
    }

    fn forget(&self, id: Uuid) {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Scrapes one claimed target and writes what it found.
    pub(crate) async fn scrape(&self, target: Claimed) -> Result<Scraped, CollectorError> {
        let started = Instant::now();
        let at = Utc::now();
        // One scrape of a target at a time in this replica (a CollectNow during a scheduled one).
        let mut cache = self.cache_of(target.instance_id).lock_owned().await;
        let read = tokio::time::timeout(target.timeout, self.read(&mut cache, &target)).await;
        let (mut outcome, label) = match read {
            Ok(Ok(read)) => match self.outcome(&mut cache, &target, at, started, read).await {
                Ok(outcome) => (outcome, "ok"),
                Err(error) => {
                    tracing::warn!(instance = %target.instance_id, %error, "reading a scrape's delta base failed");
                    self.inner
                        .metrics
                        .record(target.engine, "error", started.elapsed());
                    return Err(error);
                }
            },
            Ok(Err(ReadError::Gone)) => {
                drop(cache);
                self.forget(target.instance_id);
                // The registry no longer has it (an event replayed after a full sync can bring
                // back a job for an instance deleted since): the job goes too.
                if let Err(error) = self.drop_job(&target).await {
                    tracing::warn!(instance = %target.instance_id, %error, "removing the job of a deleted instance failed");
                }
                self.inner
                    .metrics
                    .record(target.engine, "gone", started.elapsed());
                return Ok(Scraped {
                    written: Written::Gone,
                    outcome: down(
                        at,
                        started,
                        vec!["the instance is no longer registered".into()],
                    ),
                });
            }
            Ok(Err(ReadError::Denied(why))) => (down(at, started, vec![why]), "denied"),
            Ok(Err(ReadError::Failed(why))) => (down(at, started, vec![why]), "down"),
            Err(_) => {
                // The session was inside the dropped future, mid-command: it is gone with it.
                let why = format!(
                    "no answer within the scrape timeout of {} ms; the target is overloaded or unreachable \
                     (set the {} label to change the timeout)",
                    target.timeout.as_millis(),
                    crate::registry::TIMEOUT_LABEL
                );
                (down(at, started, vec![why]), "timeout")
            }
        };
        outcome.duration = started.elapsed();
        if outcome.up {
            outcome.samples.insert(
                0,
                Sample::new(c::SCRAPE_DURATION, outcome.duration.as_secs_f64()),
            );
        }
        let written = store::write_scrape(
            &self.inner.pool,
            &target,
            &outcome,
            &self.inner.config.rules,
            &self.inner.outbox,
            &self.inner.subjects,
        )
        .await;
        let written = match written {
            Ok(w) => w,
            Err(error) => {
                tracing::warn!(instance = %target.instance_id, %error, "writing a scrape failed");
                cache.base = None;
                self.inner
                    .metrics
                    .record(target.engine, "error", started.elapsed());
                return Err(error);
            }
        };
        match written {
            Written::Ok(seq) => {
                // What the next scrape compares with: instance-level values only (the rates and
                // ratios of `scrape::derive`), not the per-table and per-statement series.
                let latest = outcome
                    .up
                    .then(|| (instance_level(&outcome.samples), outcome.at));
                let previous = cache.base.take().map(|(_, base)| base).unwrap_or_default();
                let base = store::Base {
                    snapshot: outcome.snapshot.clone().or(previous.snapshot),
                    latest: latest.or(previous.latest),
                };
                cache.base = Some((seq, base));
                if let Some(known) = &mut cache.known_texts {
                    known.extend(outcome.texts.iter().map(|(q, _)| *q));
                }
            }
            Written::Gone => {
                drop(cache);
                self.forget(target.instance_id);
            }
            Written::Stale => cache.base = None,
        }
        let label = match written {
            Written::Gone => "gone",
            Written::Stale => "stale",
            Written::Ok(_) => label,
        };
        self.inner
            .metrics
            .record(target.engine, label, started.elapsed());
        Ok(Scraped { written, outcome })
    }

    async fn drop_job(&self, target: &Claimed) -> Result<(), CollectorError> {
        let mut tx = self.inner.pool.begin().await?;
        store::delete_target(
            &mut tx,
            target.instance_id,
            target.registry_version,
            &self.inner.outbox,
            &self.inner.subjects,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Connects if needed and reads the target.
    async fn read(&self, cache: &mut TargetCache, target: &Claimed) -> Result<Read, ReadError> {
        let stale_url = cache
            .url
            .as_ref()
            .is_none_or(|(_, v)| *v != target.registry_version);
        if stale_url {
            cache.session = None;
            match self.inner.registry.connection(target.instance_id).await {
                Ok((url, version)) => cache.url = Some((url, version)),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    return Err(ReadError::Gone);
                }
                Err(status) => {
                    return Err(ReadError::Failed(format!(
                        "cannot read the connection from the registry: {}",
                        status.message()
                    )));
                }
            }
        }
        let Some((url, _)) = cache.url.as_ref() else {
            return Err(ReadError::Failed("no connection URL".into()));
        };
        // Taken out for the scrape: put back only after it went well.
        let session = match cache.session.take() {
            Some(session) => session,
            None => self.connect(target, url).await?,
        };
        match session {
            Session::Postgres(mut conn) => {
                if cache.known_texts.is_none() {
                    let known = store::known_texts(&self.inner.pool, target.instance_id)
                        .await
                        .map_err(|e| ReadError::Failed(format!("state store: {e}")))?;
                    cache.known_texts = Some(known);
                }
                let mut known = cache.known_texts.take().unwrap_or_default();
                cache
                    .texts_unresolved
                    .retain(|_, asked| asked.elapsed() < TEXT_RETRY);
                // Ids asked for recently count as known: they do not trigger another read.
                let unresolved: Vec<i64> = cache.texts_unresolved.keys().copied().collect();
                known.extend(&unresolved);
                let limits = PgLimits {
                    tables: self.inner.config.tables_per_target,
                    indexes: self.inner.config.indexes_per_target,
                };
                let read = scrape::postgres::scrape(&mut conn, &known, limits).await;
                for id in &unresolved {
                    known.remove(id);
                }
                cache.known_texts = Some(known);
                let read =
                    read.map_err(|e| ReadError::Failed(format!("the connection failed: {e}")))?;
                let now = Instant::now();
                let given: HashSet<i64> = read.texts.iter().map(|(id, _)| *id).collect();
                for id in read.texts_asked.iter().filter(|id| !given.contains(id)) {
                    cache.texts_unresolved.insert(*id, now);
                }
                cache.session = Some(Session::Postgres(conn));
                Ok(Read {
                    samples: read.samples,
                    problems: read.problems,
                    statements: read.statements,
                    texts: read.texts,
                })
            }
            Session::Redis(mut conn) => {
                let read = scrape::redis::scrape(&mut conn)
                    .await
                    .map_err(|e| ReadError::Failed(format!("the connection failed: {e}")))?;
                cache.session = Some(Session::Redis(conn));
                Ok(Read {
                    samples: read.samples,
                    problems: read.problems,
                    statements: None,
                    texts: Vec::new(),
                })
            }
        }
    }

    async fn connect(&self, target: &Claimed, url: &SecretString) -> Result<Session, ReadError> {
        let connector = &self.inner.connector;
        let result = match target.engine {
            Engine::Postgres => match connector.connect_postgres(url.expose_secret()).await {
                Ok(mut conn) => {
                    // The server gives up on a query when the scrape does, instead of running
                    // it on for the connector's general statement timeout.
                    let limit = target.timeout.min(connector.session().statement_timeout);
                    let timeout = format!(
                        "/* keel-collector */ SET statement_timeout = {}",
                        limit.as_millis().max(1)
                    );
                    match sqlx::Executor::execute(&mut conn, timeout.as_str()).await {
                        Ok(_) => Ok(Session::Postgres(conn)),
                        Err(error) => Err(TargetError::Postgres(error)),
                    }
                }
                Err(error) => Err(error),
            },
            Engine::Redis => connector
                .connect_redis(url.expose_secret())
                .await
                .map(Session::Redis),
        };
        result.map_err(|error| match error {
            TargetError::Denied(denied) => ReadError::Denied(format!(
                "not contacted: the target policy refuses it ({denied})"
            )),
            other => ReadError::Failed(format!("cannot connect: {other}")),
        })
    }

    /// The outcome of a successful read: derived samples and deltas against the base.
    async fn outcome(
        &self,
        cache: &mut TargetCache,
        target: &Claimed,
        at: chrono::DateTime<Utc>,
        started: Instant,
        read: Read,
    ) -> Result<Outcome, CollectorError> {
        let base_is_current = cache
            .base
            .as_ref()
            .is_some_and(|(seq, _)| *seq == target.scrape_seq);
        if !base_is_current {
            let base = store::load_base(&self.inner.pool, target.instance_id).await?;
            cache.base = Some((target.scrape_seq, base));
        }
        let base = cache.base.as_ref().map(|(_, b)| b);
        let mut samples = vec![Sample::new(c::UP, 1.0)];
        let mut problems = read.problems;
        samples.extend(read.samples);
        let previous = base.and_then(|b| b.latest.as_ref());
        let elapsed = previous.map_or(0.0, |(_, when)| {
            (at - *when).num_milliseconds() as f64 / 1e3
        });
        scrape::derive(previous.map(|(s, _)| s.as_slice()), elapsed, &mut samples);
        let deltas = read
            .statements
            .as_ref()
            .and_then(|now| statements::deltas(base.and_then(|b| b.snapshot.as_ref()), now));
        if let Some(d) = &deltas {
            samples.push(Sample::new(c::PG_STATEMENTS_EVICTED, d.evicted as f64));
            if d.evicted > 0 {
                problems.push(format!(
                    "pg_stat_statements evicted {} entries since the previous scrape, so the work of \
                     rarely run statements is lost; fix: raise pg_stat_statements.max (needs a restart)",
                    d.evicted
                ));
            }
        }
        if let Some(now) = &read.statements {
            statement_samples(
                now,
                deltas.as_ref(),
                self.inner.config.statements_exported,
                &mut samples,
            );
        }
        Ok(Outcome {
            at,
            duration: started.elapsed(),
            up: true,
            problems,
            samples,
            snapshot: read.statements,
            deltas,
            texts: read.texts,
        })
    }
}

struct Read {
    samples: Vec<Sample>,
    problems: Vec<String>,
    statements: Option<Snapshot>,
    texts: Vec<(i64, String)>,
}

enum ReadError {
    /// The instance is no longer registered.
    Gone,
    /// The target policy refuses the target; it was not contacted.
    Denied(String),
    Failed(String),
}

fn instance_level(samples: &[Sample]) -> Vec<Sample> {
    samples
        .iter()
        .filter(|s| s.labels.is_empty())
        .cloned()
        .collect()
}

fn down(at: chrono::DateTime<Utc>, started: Instant, problems: Vec<String>) -> Outcome {
    Outcome {
        at,
        duration: started.elapsed(),
        up: false,
        problems,
        samples: Vec::new(),
        snapshot: None,
        deltas: None,
        texts: Vec::new(),
    }
}

/// Per-statement series for the exposition: the `top` statements by time in the last interval
/// (by cumulative time on the first scrape) one by one, the rest summed as `queryid="other"`.
fn statement_samples(now: &Snapshot, deltas: Option<&Deltas>, top: usize, out: &mut Vec<Sample>) {
    let mut cumulative: HashMap<i64, statements::Counters> = HashMap::new();
    for (key, counters) in &now.entries {
        cumulative.entry(key.query_id).or_default().add(counters);
    }
    let mut recent: HashMap<i64, f64> = HashMap::new();
    match deltas {
        Some(d) => {
            for (key, counters) in &d.entries {
                *recent.entry(key.query_id).or_default() += counters.total_exec_ms;
            }
        }
        None => {
            for (id, counters) in &cumulative {
                recent.insert(*id, counters.total_exec_ms);
            }
        }
    }
    let mut ranked: Vec<(i64, f64)> = recent.into_iter().filter(|(_, ms)| *ms > 0.0).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let chosen: HashSet<i64> = ranked.iter().take(top).map(|(id, _)| *id).collect();
    let mut other = statements::Counters::default();
    let mut shown: Vec<(i64, statements::Counters)> = Vec::with_capacity(chosen.len());
    for (id, counters) in cumulative {
        if chosen.contains(&id) {
            shown.push((id, counters));
        } else {
            other.add(&counters);
        }
    }
    shown.sort_by_key(|(id, _)| *id);
    let mut push = |queryid: &str, counters: &statements::Counters| {
        let l = [("queryid", queryid)];
        out.push(Sample::labelled(
            c::PG_STATEMENT_CALLS,
            &l,
            counters.calls as f64,
        ));
        out.push(Sample::labelled(
            c::PG_STATEMENT_TIME,
            &l,
            counters.total_exec_ms / 1e3,
        ));
        out.push(Sample::labelled(
            c::PG_STATEMENT_ROWS,
            &l,
            counters.rows as f64,
        ));
    };
    for (id, counters) in &shown {
        push(&id.to_string(), counters);
    }
    push("other", &other);
}
