//! The run report: built from short real runs (a VAE with a 2-D latent, a diffusion model),
//! self-contained (no request to any address), and rendered by headless Chromium: its DOM
//! holds every section and no error, and a screenshot is not blank.
//!
//! Chromium is Debian's `chromium` (`scripts/test` installs it, and `.ci/run` sets
//! ELBO_REQUIRE_BROWSER=1, so in CI a missing browser fails the test); `CHROMIUM=/path` picks
//! another binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{elbo, stderr};

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("which").arg(name).output().ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

fn run(args: &[&str]) {
    let o = elbo(args);
    assert!(o.status.success(), "elbo {args:?}: {}", stderr(&o));
}

/// Every `http` in the page is the SVG namespace: the page asks no server for anything.
fn assert_self_contained(html: &str) {
    let mut rest = html;
    while let Some(i) = rest.find("http") {
        let tail = &rest[i..];
        assert!(
            tail.starts_with("http://www.w3.org/2000/svg"),
            "the report refers to an address: {}",
            &tail[..tail.len().min(80)]
        );
        rest = &tail[4..];
    }
    for needle in ["<script", "<link", "src=\"/", "url("] {
        assert!(!html.contains(needle), "the report holds {needle:?}");
    }
}

/// Opens `page` in headless Chromium: its DOM and a screenshot (the number of distinct
/// colours in the top 1,400 pixels).
fn render(browser: &Path, page: &Path, work: &Path) -> (String, usize) {
    let url = format!("file://{}", page.display());
    let profile = work.join("chromium-profile");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
    ];
    let dom = Command::new(browser)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", &url])
        .output()
        .expect("chromium runs");
    assert!(
        dom.status.success(),
        "chromium --dump-dom failed: {}",
        stderr(&dom)
    );
    let shot = work.join("shot.png");
    let o = Command::new(browser)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args([
            "--window-size=1100,1400",
            &format!("--screenshot={}", shot.display()),
            &url,
        ])
        .output()
        .expect("chromium runs");
    assert!(
        o.status.success(),
        "chromium --screenshot failed: {}",
        stderr(&o)
    );
    let img = image::open(&shot).expect("a PNG screenshot").to_rgb8();
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    (
        String::from_utf8_lossy(&dom.stdout).into_owned(),
        colours.len(),
    )
}

#[test]
fn reports_of_real_runs_render_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let vae = dir.path().join("vae");
    let diffusion = dir.path().join("diffusion");
    let (v, d) = (vae.to_str().unwrap(), diffusion.to_str().unwrap());
    run(&[
        "train",
        "vae",
        "--epochs",
        "2",
        "--latent-dim",
        "2",
        "--train-limit",
        "1000",
        "--test-limit",
        "200",
        "--out",
        v,
    ]);
    run(&[
        "eval",
        "vae",
        "--checkpoint",
        &format!("{v}/model.safetensors"),
        "--iw-samples",
        "50",
        "--limit",
        "100",
        "--report",
        v,
    ]);
    run(&[
        "train",
        "diffusion",
        "--epochs",
        "2",
        "--train-limit",
        "256",
        "--test-limit",
        "32",
        "--channels",
        "8",
        "--num-train-timesteps",
        "50",
        "--sample-steps",
        "5",
        "--out",
        d,
    ]);
    run(&[
        "eval",
        "diffusion",
        "--checkpoint",
        &format!("{d}/model.safetensors"),
        "--limit",
        "8",
        "--report",
        d,
    ]);
    // `elbo report` writes the same page anywhere.
    let copy = dir.path().join("copy.html");
    run(&["report", v, "--out", copy.to_str().unwrap()]);

    let vae_sections = [
        ("config", "Configuration and data"),
        ("curves", "Training curves"),
        ("evaluation", "Evaluation"),
        ("pictures", "Samples and reconstructions"),
        ("latent", "Latent space"),
    ];
    let pages = [
        (vae.join("report.html"), &vae_sections[..], 5),
        (diffusion.join("report.html"), &vae_sections[..4], 2),
    ];
    for (page, _, _) in &pages {
        let html = std::fs::read_to_string(page).unwrap();
        assert_self_contained(&html);
        assert!(
            html.contains("data:image/png;base64,"),
            "{}: no pictures",
            page.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(&copy).unwrap(),
        std::fs::read_to_string(vae.join("report.html")).unwrap()
    );
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("ELBO_REQUIRE_BROWSER").is_none(),
            "no Chromium found (install Debian's chromium, as scripts/test does, or set CHROMIUM)"
        );
        eprintln!("skipping the browser half: no chromium (install it, as scripts/test does)");
        return;
    };
    for (page, sections, min_svgs) in &pages {
        let (dom, colours) = render(&browser, page, dir.path());
        for (id, heading) in sections.iter() {
            assert!(
                dom.contains(&format!("id=\"{id}\"")),
                "{}: no section {id}",
                page.display()
            );
            assert!(
                dom.contains(heading),
                "{}: no heading {heading}",
                page.display()
            );
        }
        // The text of the page, without its pictures' base64 (which may spell anything).
        let mut text = String::new();
        let mut rest = dom.as_str();
        while let Some(i) = rest.find("base64,") {
            text.push_str(&rest[..i]);
            rest = &rest[i..];
            rest = &rest[rest.find('"').unwrap_or(rest.len())..];
        }
        text.push_str(rest);
        for bad in ["Not drawn", "error:", "Error", "NaN", "inf nats"] {
            assert!(
                !text.contains(bad),
                "{}: the page says {bad:?}",
                page.display()
            );
        }
        let svgs = dom.matches("<svg").count();
        assert!(svgs >= *min_svgs, "{}: {svgs} plots", page.display());
        // Curves, pictures and text in several colours: far from a blank page.
        assert!(
            colours > 50,
            "{}: only {colours} colours on screen",
            page.display()
        );
        println!(
            "{}: {svgs} plots, {colours} colours on the first screen",
            page.display()
        );
    }
}
