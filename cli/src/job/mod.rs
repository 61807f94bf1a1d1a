//! `queue-cli job run|manifest`: Kubernetes Jobs, locally and on a cluster.
//!
//! - [`spec`]: the flags both verbs share, with the API server's defaults and checks.
//! - [`controller`]: the Job controller's semantics as a pure state machine.
//! - [`runner`] and [`pod`]: `job run`, pods as local process groups.
//! - [`manifest`]: `job manifest`, the equivalent `batch/v1` Job as YAML.

mod controller;
mod manifest;
mod pod;
mod runner;
mod spec;

use std::process::ExitCode;

use clap::Subcommand;

use crate::output::Format;

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Run CMD as local pods with the Kubernetes Job controller's semantics: parallelism,
    /// completions, work-queue and Indexed modes, restart policies, backoff limit and
    /// back-off, active deadline, and a workq-worker's pod failure policy. Exit 0 when
    /// the Job is Complete, 1 when it Failed, 130 (Ctrl-C) or 143 (SIGTERM) when stopped.
    Run(runner::RunArgs),
    /// Print the equivalent batch/v1 Job manifest (YAML) for the same flags.
    Manifest(manifest::ManifestArgs),
}

/// `format` is the global `-o`: `job run` prints its summary as JSON with `-o json`;
/// `job manifest` prints YAML only.
pub async fn run(command: JobCommand, format: Format) -> ExitCode {
    match command {
        JobCommand::Run(args) => runner::run(args, format).await,
        JobCommand::Manifest(args) => manifest::run(args, format),
    }
}
