//! Any text as gateway.toml (`edgegate::config::Config::parse`): it must never panic, and
//! every problem it reports must point inside the text (a line and column that exist).
#![no_main]

use std::path::Path;

use edgegate::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(ConfigError::Invalid(found)) = Config::parse(text, Path::new("fuzz.toml")) {
        assert!(!found.is_empty(), "an invalid config names its problems");
        let lines: Vec<&str> = text.split('\n').collect();
        for problem in &found {
            let line = lines
                .get(problem.line - 1)
                .unwrap_or_else(|| panic!("{problem} points past the last line"));
            assert!(
                problem.column >= 1 && problem.column <= line.chars().count() + 1,
                "{problem} points past the end of its line"
            );
        }
    }
});
