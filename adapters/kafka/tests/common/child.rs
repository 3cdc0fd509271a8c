//! Running an ignored test of this test binary as a child process: a Worker the test
//! kills, or one that dies of its own abort.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

/// Runs the ignored test `name` of this test binary as a child process, with `vars`
/// in its environment. With `kill_at`, kills it (SIGKILL) the given time after it
/// printed that line. Returns how it ended and the lines it printed.
pub async fn run(
    name: &str,
    vars: &[(&str, &str)],
    kill_at: Option<(&str, Duration)>,
) -> (ExitStatus, Vec<String>) {
    let mut command = Command::new(std::env::current_exe().expect("this test binary"));
    command
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(vars.iter().copied())
        .stdout(Stdio::piped());
    let prefix = format!("test {name} ... ");
    let kill_at = kill_at.map(|(line, after)| (line.to_owned(), after));
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("run the child");
        let stdout = child.stdout.take().expect("piped");
        let mut printed = Vec::new();
        for line in BufReader::new(stdout).lines() {
            // The harness prints the test's name with no line break after it.
            let line = line.expect("the child's output");
            let line = line.trim_start_matches(&prefix).to_owned();
            let kill = kill_at.as_ref().filter(|(at, _)| *at == line);
            printed.push(line);
            if let Some((_, after)) = kill {
                std::thread::sleep(*after);
                child.kill().expect("SIGKILL the child");
                break;
            }
        }
        (child.wait().expect("the child ends"), printed)
    })
    .await
    .expect("the child ran")
}
