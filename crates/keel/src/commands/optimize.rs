//! `keel optimize`: an analysis of an instance's workload, its progress as it runs, and the
//! advice it ends with.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use keel_proto::v1::{
    AnalysisState, AnalyzeInstanceRequest, AnalyzeInstanceResponse, GetRecommendationRequest,
    Recommendation,
};

use crate::cli::{OptimizeArgs, Output, parse_window};
use crate::client::{self, Optimizer, Registry};
use crate::commands::instance::resolve;
use crate::commands::metrics::proto_duration;
use crate::failure::Failure;
use crate::output;
use crate::table::Layout;

/// How often the spinner of a progress line on a terminal turns.
const SPIN_EVERY: Duration = Duration::from_millis(120);
/// Recommendations fetched at once after an analysis.
const FETCH_CONCURRENCY: usize = 8;

pub(crate) async fn run(args: OptimizeArgs) -> anyhow::Result<()> {
    let OptimizeArgs {
        instance,
        budget,
        max_indexes,
        window,
        max_statements,
        client,
    } = args;
    // Everything that can be refused without Keel is refused before connecting.
    let budget_bytes = budget.as_deref().map(parse_budget).transpose()?;
    let window = parse_window(&window)?;
    let connection = client::connect(&client).await?;
    let found = resolve(&Registry::new(&connection), &instance).await?;
    let optimizer = Optimizer::new(&connection);
    let mut steps = optimizer
        .analyze_instance(AnalyzeInstanceRequest {
            instance_id: found.id.clone(),
            budget_bytes: budget_bytes.unwrap_or(0),
            max_indexes: max_indexes.unwrap_or(0),
            window: Some(proto_duration(window)),
            max_statements: max_statements.unwrap_or(0),
        })
        .await?;

    let mut progress = Progress::new();
    let mut analysis_id = String::new();
    let mut spin = tokio::time::interval(SPIN_EVERY);
    spin.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let analysis = loop {
        tokio::select! {
            step = steps.next() => match step {
                Some(Ok(step)) => {
                    if analysis_id.is_empty() {
                        analysis_id.clone_from(&step.analysis_id);
                    }
                    // The last step carries the analysis, printed in full below.
                    if let Some(analysis) = step.analysis {
                        break analysis;
                    }
                    let (headline, detail) = progress_line(&step);
                    progress.update(headline, detail);
                }
                Some(Err(status)) => {
                    progress.clear();
                    return Err(interrupted(&analysis_id, &found.name, Some(status)));
                }
                None => {
                    progress.clear();
                    return Err(interrupted(&analysis_id, &found.name, None));
                }
            },
            _ = spin.tick() => progress.tick(),
        }
    };
    progress.clear();

    let failed = analysis.state == AnalysisState::Failed as i32;
    let recommendations: Vec<Recommendation> =
        futures::stream::iter(analysis.recommendation_ids.iter().cloned())
            .map(|id| optimizer.get_recommendation(GetRecommendationRequest { id }))
            .buffered(FETCH_CONCURRENCY)
            .map_ok(|response| response.recommendation)
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .flatten()
            .collect();
    match client.output {
        Output::Json => output::print(output::analysis_json(
            &found.name,
            &analysis,
            &recommendations,
        ))?,
        Output::Table | Output::Wide if failed => {}
        Output::Table | Output::Wide => output::print(output::analysis_text(
            &found.name,
            &analysis,
            &recommendations,
            Layout::for_output(client.output),
        ))?,
    }
    if failed {
        let error = match analysis.error.trim() {
            "" => "no reason given; the server log has the details",
            error => error,
        };
        return Err(Failure::Other.error(format!("the analysis of {} failed: {error}", found.name)));
    }
    Ok(())
}

/// The error for a progress stream that ended before its analysis did. The analysis goes on
/// in Keel (any replica may run it): said so, with where its advice will show.
fn interrupted(analysis_id: &str, instance: &str, status: Option<tonic::Status>) -> anyhow::Error {
    let follow = if analysis_id.is_empty() {
        String::new()
    } else {
        format!(
            "; analysis {analysis_id} goes on in Keel, and `keel recs ls --instance {instance}` lists its advice once it ends"
        )
    };
    match status {
        Some(status) => anyhow::Error::from(status)
            .context(format!("the analysis's progress stopped arriving{follow}")),
        None => Failure::Unavailable.error(format!(
            "Keel ended the analysis's progress before the analysis{follow}"
        )),
    }
}

/// One step of an analysis as the progress line says it: the phase and what just happened
/// (a plain line of its own each time it changes, where stderr is no terminal), and the
/// what-if plans asked so far (only redrawn on a terminal).
pub(crate) fn progress_line(step: &AnalyzeInstanceResponse) -> (String, String) {
    let phase = match step.phase.trim() {
        "" => output::analysis_state(step.state),
        phase => phase,
    };
    let headline = match step.message.trim() {
        "" => phase.to_owned(),
        message if message == phase => phase.to_owned(),
        message => format!("{phase}: {message}"),
    };
    let detail = match step.whatif_calls {
        0 => String::new(),
        1 => "1 what-if plan".to_owned(),
        n => format!("{n} what-if plans"),
    };
    (headline, detail)
}

/// A line of progress on standard error: on a terminal one line redrawn in place with `\r`
/// (a spinner, what is happening, the time so far), cleared before the result is printed;
/// elsewhere (a log file, CI) a plain line each time the headline changes.
#[derive(Debug)]
pub(crate) struct Progress {
    terminal: bool,
    started: Instant,
    headline: String,
    detail: String,
    frame: usize,
    /// Characters of the line on screen now (0: none).
    drawn: usize,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            terminal: std::io::stderr().is_terminal(),
            started: Instant::now(),
            headline: String::new(),
            detail: String::new(),
            frame: 0,
            drawn: 0,
        }
    }

    /// Shows `headline` and `detail` (such as a count), if either changed.
    pub(crate) fn update(&mut self, headline: String, detail: String) {
        if headline == self.headline && detail == self.detail {
            return;
        }
        let new_headline = headline != self.headline;
        self.headline = headline;
        self.detail = detail;
        if self.terminal {
            self.draw();
        } else if new_headline {
            output::note(&self.headline);
        }
    }

    /// Turns the spinner (on a terminal).
    pub(crate) fn tick(&mut self) {
        if self.terminal && !self.headline.is_empty() {
            self.frame += 1;
            self.draw();
        }
    }

    fn draw(&mut self) {
        const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
        let stderr = std::io::stderr();
        let width = terminal_size::terminal_size_of(&stderr)
            .map_or(80, |(terminal_size::Width(w), _)| usize::from(w));
        let text = redrawn(
            FRAMES[self.frame % FRAMES.len()],
            &self.headline,
            &self.detail,
            self.started.elapsed(),
            width,
        );
        let shown = text.chars().count();
        let pad = " ".repeat(self.drawn.saturating_sub(shown));
        let mut stderr = stderr.lock();
        let _ = write!(stderr, "\r{text}{pad}").and_then(|()| stderr.flush());
        self.drawn = shown;
    }

    /// Removes the line from the terminal.
    pub(crate) fn clear(&mut self) {
        if self.drawn > 0 {
            let mut stderr = std::io::stderr().lock();
            let _ = write!(stderr, "\r{}\r", " ".repeat(self.drawn)).and_then(|()| stderr.flush());
            self.drawn = 0;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The line a terminal shows: `/ planning: 12 of 40 statements, 96 what-if plans (14s)`, cut
/// to one character less than `width` so that it never wraps (a wrapped line cannot be
/// redrawn in place).
fn redrawn(frame: char, headline: &str, detail: &str, elapsed: Duration, width: usize) -> String {
    let mut text = format!("{frame} {headline}");
    if !detail.is_empty() {
        text.push_str(&format!(", {detail}"));
    }
    text.push_str(&format!(" ({}s)", elapsed.as_secs()));
    let limit = width.saturating_sub(1).max(1);
    if text.chars().count() > limit {
        text = text.chars().take(limit.saturating_sub(1)).collect();
        text.push('…');
    }
    text
}

/// A `--budget` value in bytes, refused as an invalid argument (exit 3) naming the flag.
pub(crate) fn parse_budget(raw: &str) -> anyhow::Result<i64> {
    let invalid = |why: String| Failure::Invalid.error(format!("--budget: {why}"));
    let bytes = parse_size(raw).map_err(invalid)?;
    if bytes == 0 {
        return Err(invalid(format!(
            "{raw:?} leaves no room for an index; give a size above zero, or leave --budget out for 10% of the data size"
        )));
    }
    Ok(bytes)
}

/// Bytes in a size such as `500MB`, `1.5GB`, `200kB`, `500M` or `1048576`: a number (with
/// decimals if need be) and a unit, case-insensitive: none or B for bytes, k, M, G or T with
/// an optional B (or iB) for powers of 1024.
pub(crate) fn parse_size(raw: &str) -> Result<i64, String> {
    let text = raw.trim();
    let not_a_size =
        || format!("{raw:?} is not a size; write e.g. 500MB, 1.5GB, 200kB or a number of bytes");
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() || !number.chars().any(|c| c.is_ascii_digit()) {
        return Err(not_a_size());
    }
    let number: f64 = number.parse().map_err(|_| not_a_size())?;
    let power = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 1,
        "m" | "mb" | "mib" => 2,
        "g" | "gb" | "gib" => 3,
        "t" | "tb" | "tib" => 4,
        _ => return Err(not_a_size()),
    };
    let bytes = (number * 1024f64.powi(power)).round();
    // i64::MAX as f64 rounds up to 2^63, itself out of range.
    if !bytes.is_finite() || bytes >= i64::MAX as f64 {
        return Err(format!("{raw:?} is too large"));
    }
    Ok(bytes as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_units_in_powers_of_1024_with_or_without_the_b() {
        const KIB: i64 = 1024;
        for (raw, bytes) in [
            ("1048576", 1_048_576),
            ("0", 0),
            ("512B", 512),
            ("512 b", 512),
            ("200kB", 200 * KIB),
            ("200KB", 200 * KIB),
            ("200k", 200 * KIB),
            ("500MB", 500 * KIB * KIB),
            ("500M", 500 * KIB * KIB),
            ("500mb", 500 * KIB * KIB),
            ("500 MiB", 500 * KIB * KIB),
            ("1.5GB", 1_610_612_736),
            ("1.5g", 1_610_612_736),
            (".5GB", 512 * KIB * KIB),
            ("2TB", 2 * KIB * KIB * KIB * KIB),
            (" 10MB ", 10 * KIB * KIB),
            ("1.5", 2),
        ] {
            assert_eq!(parse_size(raw), Ok(bytes), "{raw}");
        }
        for raw in [
            "", "MB", "five MB", "-5MB", "5XB", "5 MBs", "1.2.3GB", "1e3", "5PB", ".", "0x10",
        ] {
            let error = parse_size(raw).expect_err(raw);
            assert!(error.contains("is not a size"), "{raw}: {error}");
        }
        let error = parse_size("99999999999TB").expect_err("too large");
        assert!(error.contains("is too large"), "{error}");
        assert!(parse_size("8388607TB").is_ok(), "just below 2^63");
    }

    #[test]
    fn a_bad_budget_is_an_invalid_argument_naming_the_flag() {
        assert_eq!(parse_budget("500MB").expect("500MB"), 524_288_000);
        for (raw, says) in [
            ("lots", "--budget: \"lots\" is not a size; write e.g. 500MB"),
            ("0MB", "--budget: \"0MB\" leaves no room for an index"),
        ] {
            let error = parse_budget(raw).expect_err(raw);
            assert_eq!(crate::failure::classify(&error), Failure::Invalid, "{raw}");
            assert!(error.to_string().starts_with(says), "{raw}: {error}");
        }
    }

    #[test]
    fn the_progress_line_says_the_phase_the_message_and_the_what_if_plans() {
        let step = AnalyzeInstanceResponse {
            analysis_id: "a".into(),
            state: AnalysisState::Running as i32,
            phase: "planning".into(),
            message: "12 of 40 statements".into(),
            whatif_calls: 96,
            analysis: None,
        };
        let (headline, detail) = progress_line(&step);
        assert_eq!(headline, "planning: 12 of 40 statements");
        assert_eq!(detail, "96 what-if plans");
        let queued = AnalyzeInstanceResponse {
            state: AnalysisState::Queued as i32,
            ..Default::default()
        };
        assert_eq!(progress_line(&queued), ("queued".into(), String::new()));
        let done = AnalyzeInstanceResponse {
            phase: "done".into(),
            message: "done".into(),
            ..Default::default()
        };
        assert_eq!(progress_line(&done).0, "done");

        let line = redrawn('/', &headline, &detail, Duration::from_secs(14), 80);
        assert_eq!(
            line,
            "/ planning: 12 of 40 statements, 96 what-if plans (14s)"
        );
        let narrow = redrawn('/', &headline, &detail, Duration::from_secs(14), 30);
        assert_eq!(narrow.chars().count(), 29, "{narrow}");
        assert!(narrow.ends_with('…'), "{narrow}");
    }

    #[test]
    fn an_interrupted_stream_names_the_analysis_that_goes_on() {
        let error = interrupted("0198", "orders", None);
        assert_eq!(crate::failure::classify(&error), Failure::Unavailable);
        assert!(
            error
                .to_string()
                .contains("analysis 0198 goes on in Keel, and `keel recs ls --instance orders`"),
            "{error}"
        );
        let error = interrupted("", "orders", Some(tonic::Status::unavailable("gone")));
        assert_eq!(crate::failure::classify(&error), Failure::Unavailable);
        assert_eq!(
            crate::failure::message(&error),
            "the analysis's progress stopped arriving: gone"
        );
    }
}
