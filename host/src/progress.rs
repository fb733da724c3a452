//! Progress a person can read on long work: a bar on stderr when it is a terminal, and log
//! lines that print above it (or plainly, when stderr is a file).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Prints `line` to stderr above `bar` (a hidden bar would swallow it, so it goes to stderr
/// directly when stderr is not a terminal).
pub fn log_line(bar: &ProgressBar, line: String) {
    if std::io::stderr().is_terminal() {
        bar.println(line);
    } else {
        eprintln!("{line}");
    }
}

/// A progress bar on stderr when it is a terminal (hidden otherwise), `prefix` before the bar.
pub fn progress_bar(len: usize, prefix: &str) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(len as u64)
    } else {
        ProgressBar::hidden()
    };
    let template =
        format!("{{spinner}} {prefix}[{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}})");
    bar.set_style(
        ProgressStyle::with_template(&template)
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}
