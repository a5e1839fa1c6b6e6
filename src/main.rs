//! Wiring only: the command line, telemetry, then `run`, `crd` or `render`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand, ValueEnum};
use warren::controller::{self, Context, validate::Settings};
use warren::server::{self, Metrics};

#[derive(Parser)]
#[command(name = "warren", version, about = "Kubernetes operator for highly available RabbitMQ clusters")]
struct Cli {
    /// Log format.
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the controller.
    Run {
        /// Watch only this namespace (all namespaces when omitted).
        #[arg(long, env = "WARREN_NAMESPACE")]
        namespace: Option<String>,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, env = "WARREN_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// The Kubernetes cluster's DNS domain.
        #[arg(long, env = "WARREN_CLUSTER_DOMAIN", default_value = "cluster.local")]
        cluster_domain: String,
        /// Management API URL of a cluster; `{service}`, `{namespace}` and `{domain}` are filled in.
        #[arg(long, env = "WARREN_MANAGEMENT_URL", default_value = "http://{service}.{namespace}.svc.{domain}:15672")]
        management_url_template: String,
    },
    /// Prints the CustomResourceDefinitions as YAML.
    Crd,
    /// Prints, as YAML, every object the operator would create for the RabbitCluster in FILE.
    Render {
        file: std::path::PathBuf,
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Crd => {
            print!("{}", warren::crds_yaml());
            std::process::ExitCode::SUCCESS
        }
        Command::Render { file, cluster_domain } => {
            let outcome =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display())).and_then(|manifest| {
                    warren::render::render(&manifest, &Settings { cluster_domain })
                        .map_err(|e| format!("{}: {e}", file.display()))
                });
            match outcome {
                Ok(yaml) => {
                    print!("{yaml}");
                    std::process::ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("warren render: {message}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Run { namespace, listen, cluster_domain, management_url_template } => {
            let client = match kube::Client::try_default().await {
                Ok(client) => client,
                Err(error) => {
                    tracing::error!(%error, "no Kubernetes client configuration");
                    return std::process::ExitCode::FAILURE;
                }
            };
            let metrics = Metrics::default();
            let ready = Arc::new(AtomicBool::new(false));
            let server = tokio::spawn(server::serve(listen, metrics.clone(), ready.clone()));
            let ctx = Arc::new(Context::new(client, Settings { cluster_domain }, management_url_template, metrics));
            tracing::info!(namespace = namespace.as_deref().unwrap_or("<all>"), %listen, "warren controller starting");
            ready.store(true, Ordering::Relaxed);
            tokio::select! {
                _ = controller::run(ctx, namespace) => std::process::ExitCode::SUCCESS,
                result = server => {
                    tracing::error!(?result, "the health and metrics server stopped");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
