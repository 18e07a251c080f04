//! The link to NATS: the names of the fleet's streams, subjects and buckets (all derived
//! from one prefix), connecting with TLS and credentials from files, and creating the
//! streams and buckets (an administrator's job; agents only look them up).

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use super::{FleetError, config::FleetConfig, nats};

/// Every name the fleet uses, from the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
    upper: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            upper: prefix.to_ascii_uppercase().replace('-', "_"),
        }
    }

    pub fn control_stream(&self) -> String {
        format!("{}_CONTROL", self.upper)
    }
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.upper)
    }
    /// Identity signals (SETs, as their transmitter signed them) that every agent applies.
    pub fn signals_stream(&self) -> String {
        format!("{}_SIGNALS", self.upper)
    }
    /// Commands still in force (lock adds, user terminations, the last policy), signed, by
    /// command id: what an agent whose position was purged resynchronises from.
    pub fn snapshot_bucket(&self) -> String {
        format!("{}_SNAPSHOT", self.upper)
    }
    /// host → [`super::view::HostView`].
    pub fn hosts_bucket(&self) -> String {
        format!("{}_HOSTS", self.upper)
    }
    /// host → that host's live sessions.
    pub fn sessions_bucket(&self) -> String {
        format!("{}_SESSIONS", self.upper)
    }
    pub fn control_all(&self) -> String {
        format!("{}.control.all", self.prefix)
    }
    pub fn control_host(&self, host: &str) -> String {
        format!("{}.control.host.{host}", self.prefix)
    }
    pub fn control_subjects(&self) -> String {
        format!("{}.control.>", self.prefix)
    }
    pub fn events(&self, host: &str, kind: &str) -> String {
        format!("{}.events.{host}.{kind}", self.prefix)
    }
    pub fn events_subjects(&self) -> String {
        format!("{}.events.>", self.prefix)
    }
    /// Where `from` (a host that accepted the SET, or a relay's own name) publishes a SET.
    pub fn signals(&self, from: &str) -> String {
        format!("{}.signals.{from}", self.prefix)
    }
    pub fn signals_subjects(&self) -> String {
        format!("{}.signals.>", self.prefix)
    }
    /// Every host's events of one kind.
    pub fn events_of_kind(&self, kind: &str) -> String {
        format!("{}.events.*.{kind}", self.prefix)
    }
    /// The durable consumer of one host on the control stream (and on the signals stream).
    pub fn durable(&self, host: &str) -> String {
        format!("agent-{host}")
    }
}

fn read_secret(path: &std::path::Path, what: &'static str) -> Result<String, FleetError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| FleetError::Read {
            what,
            path: path.to_owned(),
            source,
        })
}

/// Connects (and keeps reconnecting, with backoff up to 5 s) to the configured servers.
/// With `wait`, the first connection must succeed; otherwise the client connects in the
/// background and `on_event` hears about it.
///
/// # Errors
/// Unreadable credential files, or (with `wait`) no server reachable.
pub async fn connect(
    config: &FleetConfig,
    name: String,
    wait: bool,
    on_event: impl Fn(async_nats::Event) + Send + Sync + 'static,
) -> Result<async_nats::Client, FleetError> {
    let on_event = std::sync::Arc::new(on_event);
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100u64 << attempts.min(6)).min(5_000))
        })
        .event_callback(move |event| {
            let on_event = std::sync::Arc::clone(&on_event);
            async move { on_event(event) }
        });
    if !wait {
        options = options.retry_on_initial_connect();
    }
    if let Some(ca) = &config.ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if let (Some(user), Some(file)) = (&config.user, &config.password_file) {
        options = options.user_and_password(user.clone(), read_secret(file, "the NATS password")?);
    }
    if let Some(file) = &config.nkey_file {
        options = options.nkey(read_secret(file, "the NATS nkey seed")?);
    }
    if let Some(file) = &config.creds_file {
        options = options
            .credentials_file(file)
            .await
            .map_err(|source| FleetError::Read {
                what: "the NATS credentials",
                path: file.clone(),
                source,
            })?;
    }
    options
        .connect(config.servers.as_slice())
        .await
        .map_err(|e| {
            nats("connect to the fleet servers")(format!("{}: {e}", config.servers.join(", ")))
        })
}

/// Creates the fleet's streams and buckets, or finds them: idempotent. `replicas` is the
/// JetStream replication (3 on a three-server cluster).
///
/// # Errors
/// The servers refuse (no JetStream, or a stream exists with other settings).
pub async fn ensure(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
) -> Result<(), FleetError> {
    js.get_or_create_stream(stream::Config {
        name: names.control_stream(),
        subjects: vec![names.control_subjects()],
        num_replicas: replicas,
        // Publishers retry with the command id as message id: a retry is stored once.
        duplicate_window: Duration::from_secs(120),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| nats("create the control stream")(e.to_string()))?;
    js.get_or_create_stream(stream::Config {
        name: names.events_stream(),
        subjects: vec![names.events_subjects()],
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| nats("create the events stream")(e.to_string()))?;
    js.get_or_create_stream(stream::Config {
        name: names.signals_stream(),
        subjects: vec![names.signals_subjects()],
        num_replicas: replicas,
        // Every agent that accepts a SET publishes it, with its issuer and jti as message id:
        // the copies that arrive within the window are stored once.
        duplicate_window: Duration::from_secs(120),
        // A SET older than the longest iat window a receiver may allow is refused anyway.
        max_age: Duration::from_secs(crate::signals::config::MAX_IAT_WINDOW_SECS),
        max_message_size: 64 * 1024,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| nats("create the signals stream")(e.to_string()))?;
    for (bucket, history) in [
        (names.snapshot_bucket(), 1),
        (names.hosts_bucket(), 1),
        (names.sessions_bucket(), 1),
    ] {
        if js.get_key_value(&bucket).await.is_ok() {
            continue;
        }
        js.create_key_value(kv::Config {
            bucket: bucket.clone(),
            history,
            num_replicas: replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| nats("create a bucket")(format!("{bucket}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("fw-test");
        assert_eq!(n.control_stream(), "FW_TEST_CONTROL");
        assert_eq!(n.control_host("web-1"), "fw-test.control.host.web-1");
        assert_eq!(
            n.events("web-1", "session_admitted"),
            "fw-test.events.web-1.session_admitted"
        );
        assert_eq!(n.snapshot_bucket(), "FW_TEST_SNAPSHOT");
        assert_eq!(n.signals_stream(), "FW_TEST_SIGNALS");
        assert_eq!(n.signals("web-1"), "fw-test.signals.web-1");
    }
}
