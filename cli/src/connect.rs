//! The global flags every command shares, the connection they describe, and the one
//! place where a failure becomes the single line the user reads on stderr.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use workq_proto::client::Answered;
use workq_proto::client::DEFAULT_SERVER;
use workq_proto::{Client, ClientError, ConnectOptions};

use crate::output::Format;

/// Flags accepted before or after any command.
#[derive(Args, Debug)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// Coordinator gRPC address.
    #[arg(long, global = true, env = "WORKQ_SERVER", value_name = "URL")]
    #[arg(default_value = DEFAULT_SERVER)]
    pub server: String,

    /// Bearer token, when the coordinator was started with --token-file.
    #[arg(long, global = true, env = "WORKQ_TOKEN", value_name = "TOKEN")]
    #[arg(hide_env_values = true)]
    pub token: Option<String>,

    /// PEM CA certificate(s) an https:// coordinator's certificate must chain to,
    /// instead of the system's (like curl's --cacert).
    #[arg(long, global = true, env = "WORKQ_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,

    /// How long a connection attempt may take (the TCP connect, then the
    /// coordinator's first answer or TLS handshake) before the command fails.
    #[arg(long, global = true, env = "WORKQ_CONNECT_TIMEOUT")]
    #[arg(value_name = "DURATION", default_value = "5s", value_parser = crate::commands::parse_positive)]
    pub connect_timeout: Duration,

    /// Output format: aligned tables for people, or stable JSON for scripts.
    #[arg(short = 'o', long = "output", global = true, value_enum)]
    #[arg(default_value_t = Format::Table)]
    pub output: Format,

    /// Whether the coordinator has answered this run's client: a connection that
    /// breaks after that was lost, not refused.
    #[arg(skip)]
    answered: OnceLock<Answered>,

    /// True when `ca_cert` came from WORKQ_CA_CERT, not from --ca-cert.
    #[arg(skip)]
    ca_cert_from_env: bool,
}

impl Global {
    /// Notes where the flags' values came from (`matches` is what they were parsed
    /// from).
    pub fn note_sources(&mut self, matches: &ArgMatches) {
        self.ca_cert_from_env = matches.value_source("ca_cert") == Some(ValueSource::EnvVariable);
    }

    /// Connects to the coordinator once; an unreachable server fails here.
    pub async fn connect(&self) -> Result<Client, ClientError> {
        let client = Client::connect(self.options()?).await?;
        // A command connects once; should one connect again, the first client's
        // answers say as much about the coordinator.
        let _ = self.answered.set(client.answered());
        Ok(client)
    }

    /// True once the coordinator has answered a call of this run.
    fn was_answered(&self) -> bool {
        self.answered.get().is_some_and(Answered::get)
    }

    /// How to reach the coordinator; fails on an unreadable --ca-cert.
    ///
    /// A CA file only WORKQ_CA_CERT names is left out for an http:// coordinator: a
    /// shell that exports it for a coordinator serving TLS can still use a plain one.
    /// Given as --ca-cert with http://, it is a mistake, and said to be one.
    pub fn options(&self) -> Result<ConnectOptions, ClientError> {
        let plain = self.server.starts_with("http://");
        let ca_cert = self.ca_cert.as_deref();
        if plain && ca_cert.is_some() && !self.ca_cert_from_env {
            return Err(ClientError::InvalidUrl {
                url: self.server.clone(),
                reason: "--ca-cert is for a coordinator serving TLS: use https://".into(),
            });
        }
        let mut options = ConnectOptions::new(self.server.clone())
            .token(self.token.clone())
            .ca_cert_file(ca_cert.filter(|_| !plain))?;
        options.connect_timeout = self.connect_timeout;
        Ok(options)
    }

    /// True when a non-empty token will be sent.
    fn has_token(&self) -> bool {
        self.token.as_deref().is_some_and(|t| !t.is_empty())
    }

    /// One line naming what went wrong, with the context only the CLI knows (the
    /// server address, whether a token was sent).
    pub fn describe(&self, error: &anyhow::Error) -> String {
        // anyhow's chain runs from the outermost context to the root cause; a
        // coordinator status is the root of interest and gets the CLI's wording.
        let mut parts = Vec::new();
        for cause in error.chain() {
            let status = cause.downcast_ref::<tonic::Status>().or_else(|| {
                cause
                    .downcast_ref::<ClientError>()
                    .and_then(ClientError::status)
            });
            if let Some(status) = status {
                parts.push(self.describe_status(status));
                break;
            }
            parts.push(cause.to_string());
        }
        one_line(&parts.join(": "))
    }

    fn describe_status(&self, status: &tonic::Status) -> String {
        let message = status.message().trim();
        match status.code() {
            tonic::Code::Unauthenticated if self.has_token() => format!(
                "the coordinator at {} refused the token{}: check --token or WORKQ_TOKEN",
                self.server,
                suffix(message)
            ),
            // The coordinator's own message ("missing token") adds nothing here.
            tonic::Code::Unauthenticated => format!(
                "the coordinator at {} wants a token: pass --token or set WORKQ_TOKEN",
                self.server
            ),
            // The coordinator answered, on its way out ("shutting down", or a storage
            // failure whose message says whether the change is on disk).
            tonic::Code::Unavailable
                if !message.is_empty() && !workq_proto::client::is_transport_status(status) =>
            {
                format!("the coordinator at {}: {message}", self.server)
            }
            // The connection failed or broke.
            _ if workq_proto::client::is_transient_status(status) => {
                let reason = if workq_proto::client::went_away(status) {
                    "it closed the connection (HTTP/2 GOAWAY)"
                } else if message.is_empty() {
                    "connection lost"
                } else {
                    message
                };
                if workq_proto::client::pings_unanswered(status) {
                    // A port that took the connection and then said nothing, or a
                    // coordinator that stopped answering mid-call.
                    let lost = if self.was_answered() {
                        "lost the connection to"
                    } else {
                        "cannot reach"
                    };
                    format!(
                        "{lost} coordinator at {}: {}",
                        self.server,
                        workq_proto::client::PINGS_UNANSWERED
                    )
                } else if self.was_answered() {
                    // The coordinator had answered on this connection, so it was
                    // reachable, and spoke plain HTTP/2: it stopped or restarted.
                    format!(
                        "lost the connection to the coordinator at {} (it stopped or \
                         restarted): {reason}",
                        self.server
                    )
                } else {
                    format!(
                        "cannot reach coordinator at {}: {}",
                        self.server,
                        workq_proto::client::with_tls_hint(&self.server, reason.into())
                    )
                }
            }
            // An HTTP error page read as a gRPC answer.
            _ if workq_proto::client::answered_by_plain_http(status) => format!(
                "{message} (is this the coordinator's HTTP port? queue-cli talks to its \
                 gRPC port (default 7070))"
            ),
            _ => workq_proto::client::describe_status(status),
        }
    }
}

fn suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" ({message})")
    }
}

/// Error text may carry newlines (transport errors, server messages); the contract
/// is one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
