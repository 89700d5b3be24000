//! The run options through the `distill` binary: written before the `distill`
//! subcommand they run what they say, before another subcommand they are refused, and
//! the methods the help, the errors and the README list are `Method::ALL`.

mod common;

use dfkd::pipeline::methods::Method;
use std::process::{Command, Output};

fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn options_before_distill_run_what_they_say() {
    let tmp = std::env::temp_dir().join(format!("dfkd-cli-options-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let mut cfg = common::tiny(&tmp);
    cfg.distill.epochs = 1;
    let config = tmp.join("tiny.toml");
    std::fs::write(&config, cfg.to_toml()).unwrap();
    let config = config.to_str().unwrap();
    let out = distill(&["--config", config, "--method", "dafl", "--gpus", "2", "--run", "x", "distill"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("(dafl), device cpu, 2 data-parallel ranks"), "{}", text(&out));
    let saved = std::fs::read_to_string(tmp.join("x/config.toml")).unwrap();
    assert!(saved.contains("method = \"dafl\"") && saved.contains("ranks = 2"), "{saved}");
    // a run option before a subcommand it does not apply to
    let refused = distill(&["--config", config, "--run", "x", "show-config"]);
    assert!(!refused.status.success() && text(&refused).contains("--run applies to distillation runs only"), "{}", text(&refused));
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn the_methods_listed_are_the_one_list() {
    let help = text(&distill(&["distill", "--help"]));
    for m in Method::ALL {
        assert!(help.contains(m.name()) && help.contains(m.about()), "{m} missing from the help:\n{help}");
    }
    // a config with an unknown method names every choice
    let bad = distill(&["--set", "distill.method=nope", "show-config"]);
    assert!(!bad.status.success() && Method::ALL.iter().all(|m| text(&bad).contains(m.name())), "{}", text(&bad));
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
    assert!(readme.contains(&format!("--method {}", names.join("|"))), "the README's command list names other methods than {names:?}");
}
