//! `kubectl-stillpoint`: the `stillpoint` CLI as a kubectl plugin
//! (`kubectl stillpoint …`), always in Kubernetes mode, with kubectl's
//! `-n`/`--namespace`, `--context` and `--kubeconfig`.

use std::process::ExitCode;

use stillpoint_controller::cli;

fn main() -> ExitCode {
    let cli = cli::parse_kubectl_plugin();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kubectl stillpoint: {err:#}");
            ExitCode::FAILURE
        }
    }
}
