//! `keel events tail`: a JetStream subscriber printing Keel's events as they happen.

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::stream::ConsumerErrorKind;
use futures::StreamExt;
use keel_bus::{Filter, SubjectRoot};
use keel_proto::v1::Event;
use prost::Message;

use crate::cli::{EventsCommand, Output};
use crate::failure::{Failure, Kind as _};
use crate::output;

pub(crate) async fn run(command: EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::Tail {
        subject,
        tenant,
        service,
        from_start,
        count,
        consumer_name,
        inbox_prefix,
        nats,
        output,
    } = command;
    nats.validate()?;
    // A tenant that cannot exist matches no event: refused instead of waiting for ever.
    if let Some(tenant) = &tenant {
        keel_auth::validate_tenant(tenant).context("--tenant")?;
    }
    let root = SubjectRoot::new(&nats.subject_root)
        .context("--nats-subject-root / KEEL_NATS_SUBJECT_ROOT")
        .kind(Failure::Invalid)?;
    let subject = match subject {
        Some(subject) => subject,
        None => root
            .filter(&Filter {
                service: service.as_deref(),
                tenant: tenant.as_deref(),
                ..Filter::default()
            })
            .kind(Failure::Invalid)?,
    };
    let server = keel_config::redact_url(&nats.url);
    // What the server refused (a permission, typically): requests it drops only time out, and
    // the reason arrives on its own as an error event.
    let refused = Arc::new(Mutex::new(None::<String>));
    let mut options = keel_bus::with_url_auth(async_nats::ConnectOptions::new(), &nats.url)
        .name("keel-events-tail")
        .custom_inbox_prefix(inbox_prefix)
        .event_callback({
            let refused = refused.clone();
            move |event| {
                let refused = refused.clone();
                async move {
                    if let async_nats::Event::ServerError(error) = event
                        && let Ok(mut refused) = refused.lock()
                    {
                        *refused = Some(error.to_string());
                    }
                }
            }
        });
    if let Some(path) = &nats.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("cannot read NATS credentials {}", path.display()))
            .kind(Failure::Invalid)?;
    }
    let client = options
        .connect(&nats.url)
        .await
        // Its kind (unreachable, refused credentials, a bad address) decides the exit code.
        .with_context(|| format!("cannot connect to NATS at {server}"))?;
    let jetstream = async_nats::jetstream::new(client);
    // Created on the stream by name: a confined user needs no right to read the stream's info.
    // An ephemeral consumer: nothing is left behind on the server when the tail stops.
    let consumer = jetstream
        .create_consumer_on_stream(
            pull::Config {
                name: consumer_name,
                filter_subject: subject.clone(),
                deliver_policy: if from_start {
                    DeliverPolicy::All
                } else {
                    DeliverPolicy::New
                },
                ack_policy: AckPolicy::None,
                inactive_threshold: std::time::Duration::from_secs(30),
                ..Default::default()
            },
            &nats.stream,
        )
        .await
        .map_err(|error| {
            if let ConsumerErrorKind::JetStream(js) = error.kind()
                && js.error_code() == ErrorCode::STREAM_NOT_FOUND
            {
                return Failure::NotFound.error(format!(
                    "no stream {} on {server}: has `keel serve` run against this NATS with this --nats-stream?",
                    nats.stream
                ));
            }
            let refused = refused.lock().ok().and_then(|r| r.clone());
            // A refused request is dropped by the server and only times out: the reason, when
            // it came, says it was a permission, not an unreachable server.
            let kind = match (&refused, error.kind()) {
                (Some(_), _) => Failure::Auth,
                (None, ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request) => {
                    Failure::Unavailable
                }
                (None, ConsumerErrorKind::InvalidName) => Failure::Invalid,
                (None, _) => Failure::Other,
            };
            let error = anyhow::Error::new(error);
            let error = match refused {
                Some(reason) => error.context(format!(
                    "NATS refused it ({reason}): check the user's permissions for this stream, filter, consumer name and inbox prefix"
                )),
                None => error,
            }
            .context(format!("cannot subscribe to {subject} on stream {}", nats.stream));
            kind.wrap(error)
        })?;
    let consumer_name = consumer.cached_info().name.clone();
    let mut messages = consumer
        .messages()
        .await
        .context("cannot pull events")
        .kind(Failure::Unavailable)?;
    if output != Output::Json {
        output::note(format_args!("watching {subject} (Ctrl-C to stop)"));
    }
    let mut seen = 0;
    let outcome = loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            next = messages.next() => match next {
                Some(Ok(message)) => message,
                Some(Err(error)) => break Err(Failure::Unavailable.wrap(anyhow::Error::new(error).context("receiving events failed"))),
                None => break Ok(()),
            },
        };
        let subject = message.subject.to_string();
        let printed = match Event::decode(message.payload.as_ref()) {
            Ok(event) => match output {
                Output::Json => output::print(output::event_json(&subject, &event)),
                Output::Table | Output::Wide => output::print(output::event_line(&subject, &event)),
            },
            Err(error) => {
                output::note(format_args!(
                    "skipping undecodable message on {subject}: {error}"
                ));
                Ok(())
            }
        };
        // The reader went away: stop, and clean up below.
        if let Err(error) = printed {
            break Err(error);
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break Ok(());
        }
    };
    // Frees the name at once for the next tail; the server drops it after 30 s anyway.
    drop(messages);
    let _ = jetstream
        .delete_consumer_from_stream(&consumer_name, &nats.stream)
        .await;
    outcome
}
