//! `host plot`: the experiment history from `results/results.tsv`, drawn as SVG and PNG.
//!
//! [`History::read`] takes the comparison rows (those with a verdict; `host run` rows are
//! single measurements, not experiments) of one harness and one device, the newest row's unless
//! asked otherwise: rows of different harnesses, or of a CPU and a GPU (or of 1 and 2 threads),
//! are never put on one scale. [`draw`] plots B's decode
//! rate per experiment, marked by outcome (kept, reverted, noise, crashed), and the running best
//! decode rate of what was kept. Text needs a TrueType font, found on the system (or named by
//! `AUTOINFER_FONT`), since plotters draws its own glyphs.

use crate::ledger::row::{ResultsRow, Status, Verdict};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One experiment: a `host compare` row.
#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    pub time: String,
    /// B's median decode rate; `None` when the comparison failed before any figure.
    pub decode: Option<f64>,
    /// A's decode rate implied by B's and the ratio B/A.
    pub decode_a: Option<f64>,
    pub outcome: Mark,
    pub description: String,
}

/// How an experiment ended, as drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Kept,
    Reverted,
    Noise,
    Crashed,
}

/// The experiments of one harness on one device and one model, in order, and what was left
/// out.
#[derive(Debug)]
pub struct History {
    pub harness: String,
    /// The rows' device column (`cpu`, `cpu, 1 thread`, `cuda:0 (NVIDIA H200)`).
    pub device: String,
    pub experiments: Vec<Experiment>,
    /// Comparison rows of other harnesses, not drawn.
    pub other_harness_rows: usize,
    /// Comparison rows of this harness on other devices, not drawn.
    pub other_device_rows: usize,
    /// Comparison rows of this harness and device on other models (a synthetic shape's
    /// figures are not the real model's), not drawn.
    pub other_model_rows: usize,
}

impl History {
    /// Reads the comparison rows of `harness` (the newest comparison's when `None`) on `device`
    /// (its newest row's when `None`), on the model of the newest of those rows.
    pub fn read(results: &Path, harness: Option<&str>, device: Option<&str>) -> Result<History> {
        let rows = crate::ledger::row::read_rows(results)?;
        let compared: Vec<_> = rows
            .iter()
            .filter(|r| match r.verdict {
                // A screen is a first look, never an experiment of the loop.
                Some(v) => !v.is_screen(),
                None => is_failed_compare(r),
            })
            .collect();
        let Some(newest) = compared.last() else {
            bail!(
                "{} holds no `host compare` rows yet: run a comparison first",
                results.join("results.tsv").display()
            );
        };
        let harness = match harness {
            Some(h) => h.to_string(),
            None => newest.harness.clone(),
        };
        let of_harness: Vec<_> = compared
            .iter()
            .filter(|r| {
                (r.harness.starts_with(&harness) || harness.starts_with(r.harness.as_str()))
                    && !harness.is_empty()
            })
            .collect();
        let Some(last) = of_harness.last() else {
            bail!(
                "no `host compare` rows of harness {harness} in {}",
                results.join("results.tsv").display()
            );
        };
        let device = device.map_or_else(|| last.device.clone(), str::to_string);
        let on_device: Vec<_> = of_harness.iter().filter(|r| r.device == device).collect();
        if on_device.is_empty() {
            let mut devices: Vec<&str> = of_harness.iter().map(|r| r.device.as_str()).collect();
            devices.sort();
            devices.dedup();
            bail!(
                "no `host compare` rows of harness {harness} on device {device:?} in {}; its \
                 rows are on {}",
                results.join("results.tsv").display(),
                devices.join(", ")
            );
        }
        let model = on_device
            .last()
            .map(|r| r.model.clone())
            .unwrap_or_default();
        let mine: Vec<_> = on_device.iter().filter(|r| r.model == model).collect();
        let experiments = mine
            .iter()
            .map(|r| {
                let decode = r.decode_tok_s.parse::<f64>().ok();
                let ratio = r
                    .decode_ratio
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<f64>().ok());
                let outcome = match (r.status, r.verdict) {
                    (Status::Failed, _) => Mark::Crashed,
                    (_, Some(Verdict::Keep)) => Mark::Kept,
                    (_, Some(Verdict::Noise)) => Mark::Noise,
                    _ => Mark::Reverted,
                };
                Experiment {
                    time: r.time.clone(),
                    decode,
                    decode_a: decode.zip(ratio).map(|(d, r)| d / r),
                    outcome,
                    description: r.description.clone(),
                }
            })
            .collect();
        Ok(History {
            other_harness_rows: compared.len() - of_harness.len(),
            other_device_rows: of_harness.len() - on_device.len(),
            other_model_rows: on_device.len() - mine.len(),
            harness,
            device,
            experiments,
        })
    }

    /// The best decode rate kept so far after each experiment: the first comparison's A to
    /// begin with, raised by each KEEP.
    pub fn running_best(&self) -> Vec<Option<f64>> {
        let mut best = self.experiments.iter().find_map(|e| e.decode_a);
        self.experiments
            .iter()
            .map(|e| {
                if e.outcome == Mark::Kept {
                    best = match (best, e.decode) {
                        (Some(b), Some(d)) => Some(b.max(d)),
                        (b, d) => b.or(d),
                    };
                }
                best
            })
            .collect()
    }
}

/// A failed comparison's row has no verdict but does name what it was against.
fn is_failed_compare(r: &ResultsRow) -> bool {
    r.status == Status::Failed && !r.against.is_empty() && r.against != "-"
}

/// Loads a TrueType font for the plot's text: `AUTOINFER_FONT`, else a common system path.
fn load_font() -> Result<()> {
    let candidates: Vec<PathBuf> = std::env::var_os("AUTOINFER_FONT")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/System/Library/Fonts/Supplemental/Arial.ttf",
                "/Library/Fonts/Arial.ttf",
            ]
            .map(PathBuf::from),
        )
        .collect();
    let path = candidates.iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "no TrueType font for the plot's text (looked at {}): install one (Debian: apt-get install fonts-dejavu-core) or set AUTOINFER_FONT to a .ttf file",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })?;
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read font {}", path.display()))?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a TrueType font plotters can read",
            path.display()
        )
    })
}

/// Draws `history` to `<stem>.svg` and `<stem>.png`; returns both paths.
pub fn draw(history: &History, stem: &Path) -> Result<(PathBuf, PathBuf)> {
    load_font()?;
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    if let Some(dir) = stem.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    {
        let root = SVGBackend::new(&svg, (1000, 560)).into_drawing_area();
        chart(history, &root).with_context(|| format!("cannot draw {}", svg.display()))?;
        root.present()
            .with_context(|| format!("cannot write {}", svg.display()))?;
    }
    let size = (1000, 560);
    let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        chart(history, &root).with_context(|| format!("cannot draw {}", png.display()))?;
        root.present()
            .with_context(|| format!("cannot draw {}", png.display()))?;
    }
    write_png(&png, &rgb, size).with_context(|| format!("cannot write {}", png.display()))?;
    Ok((svg, png))
}

/// Writes 8-bit RGB pixels, row by row, as a PNG file. The `png` crate does it directly;
/// plotters' own file output would bring in the `image` crate and its other codecs, about 16 s
/// of CPU in a fresh build of the host.
fn write_png(path: &Path, rgb: &[u8], (width, height): (u32, u32)) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(())
}

fn chart<DB: DrawingBackend>(history: &History, area: &DrawingArea<DB, Shift>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE)?;
    let best = history.running_best();
    let n = history.experiments.len();
    let top = history
        .experiments
        .iter()
        .flat_map(|e| [e.decode, e.decode_a])
        .flatten()
        .chain(best.iter().flatten().copied())
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "autoinfer: {n} experiment(s), harness {}, {}",
                &history.harness[..12.min(history.harness.len())],
                history.device
            ),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(n as f64 + 1.0), 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("experiment (host compare, in order)")
        .y_desc("decode rate of B, tokens/s (median)")
        .label_style(("sans-serif", 14))
        .draw()?;

    let points = |mark: Mark| {
        history
            .experiments
            .iter()
            .enumerate()
            .filter(move |(_, e)| e.outcome == mark)
            .map(|(i, e)| ((i + 1) as f64, e.decode.unwrap_or(0.0)))
            .collect::<Vec<_>>()
    };
    let green = RGBColor(0, 140, 60);
    let red = RGBColor(200, 40, 40);
    let grey = RGBColor(140, 140, 140);
    chart
        .draw_series(
            points(Mark::Noise)
                .into_iter()
                .map(|p| Circle::new(p, 5, grey.filled())),
        )?
        .label("noise")
        .legend(move |(x, y)| Circle::new((x + 10, y), 5, grey.filled()));
    chart
        .draw_series(
            points(Mark::Reverted)
                .into_iter()
                .map(|p| Cross::new(p, 6, red.stroke_width(2))),
        )?
        .label("reverted")
        .legend(move |(x, y)| Cross::new((x + 10, y), 6, red.stroke_width(2)));
    chart
        .draw_series(
            points(Mark::Crashed)
                .into_iter()
                .map(|p| TriangleMarker::new(p, 7, BLACK.filled())),
        )?
        .label("crashed / failed (drawn at 0)")
        .legend(|(x, y)| TriangleMarker::new((x + 10, y), 7, BLACK.filled()));
    chart
        .draw_series(
            points(Mark::Kept)
                .into_iter()
                .map(|p| Circle::new(p, 7, green.filled())),
        )?
        .label("kept")
        .legend(move |(x, y)| Circle::new((x + 10, y), 7, green.filled()));
    let steps: Vec<(f64, f64)> = best
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.map(|b| ((i + 1) as f64, b)))
        .flat_map(|(x, b)| [(x - 0.5, b), (x + 0.5, b)])
        .collect();
    chart
        .draw_series(LineSeries::new(steps, green.stroke_width(2)))?
        .label("running best kept")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_results(dir: &Path, rows: &[[&str; 6]]) {
        let on_cpu: Vec<[&str; 7]> = rows
            .iter()
            .map(|r| [r[0], r[1], r[2], r[3], r[4], r[5], "cpu"])
            .collect();
        write_results_on(dir, &on_cpu);
    }

    fn write_results_on(dir: &Path, rows: &[[&str; 7]]) {
        // time, harness, decode_tok_s, decode_ratio, verdict, status, device
        let header = crate::ledger::row::COLUMNS.join("\t");
        let mut text = format!("{header}\n");
        for r in rows {
            let line: Vec<String> = crate::ledger::row::COLUMNS
                .iter()
                .map(|c| match *c {
                    "time" => r[0].into(),
                    "harness" => r[1].into(),
                    "decode_tok_s" => r[2].into(),
                    "decode_ratio" => r[3].into(),
                    "verdict" => r[4].into(),
                    "status" => r[5].into(),
                    "device" => r[6].into(),
                    "against" => "HEAD:variants/current".into(),
                    _ => "x".into(),
                })
                .collect();
            text.push_str(&line.join("\t"));
            text.push('\n');
        }
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("results.tsv"), text).unwrap();
    }

    #[test]
    fn history_keeps_one_harness_and_tracks_the_best_kept() {
        let dir = std::env::temp_dir().join(format!("autoinfer-plot-{}", std::process::id()));
        write_results(
            &dir,
            &[
                [
                    "t0",
                    "oldharness00",
                    "30.0",
                    "1.5000 [1.4, 1.6]",
                    "KEEP",
                    "ok",
                ],
                [
                    "t1",
                    "aaaaaaaaaaaa",
                    "21.0",
                    "1.0500 [1.03, 1.07]",
                    "KEEP",
                    "ok",
                ],
                [
                    "t2",
                    "aaaaaaaaaaaa",
                    "19.0",
                    "0.9000 [0.88, 0.92]",
                    "REVERT",
                    "ok",
                ],
                ["t3", "aaaaaaaaaaaa", "-", "-", "-", "failed"],
                [
                    "t3b",
                    "aaaaaaaaaaaa",
                    "40.0",
                    "1.9000 [1.8, 2.0]",
                    "SCREEN-KEEP",
                    "ok",
                ],
                [
                    "t4",
                    "aaaaaaaaaaaa",
                    "21.1",
                    "1.0010 [0.99, 1.01]",
                    "NOISE",
                    "ok",
                ],
                [
                    "t5",
                    "aaaaaaaaaaaa",
                    "23.0",
                    "1.0900 [1.05, 1.12]",
                    "KEEP",
                    "ok",
                ],
            ],
        );
        let h = History::read(&dir, None, None).unwrap();
        assert_eq!(h.other_harness_rows, 1, "the old harness's row is left out");
        assert_eq!(h.experiments.len(), 5, "the screen is not an experiment");
        let marks: Vec<Mark> = h.experiments.iter().map(|e| e.outcome).collect();
        assert_eq!(
            marks,
            [
                Mark::Kept,
                Mark::Reverted,
                Mark::Crashed,
                Mark::Noise,
                Mark::Kept
            ]
        );
        let best: Vec<f64> = h.running_best().into_iter().map(|b| b.unwrap()).collect();
        assert_eq!(best, [21.0, 21.0, 21.0, 21.0, 23.0]);
        assert!((h.experiments[0].decode_a.unwrap() - 20.0).abs() < 1e-9);

        let (svg, png) = draw(&h, &dir.join("progress")).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.contains("<svg") && text.contains("running best kept"),
            "{svg:?}"
        );
        assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).unwrap();

        let empty =
            std::env::temp_dir().join(format!("autoinfer-plot-empty-{}", std::process::id()));
        write_results(&empty, &[]);
        let err = History::read(&empty, None, None).unwrap_err().to_string();
        assert!(err.contains("no `host compare` rows"), "{err}");
        std::fs::remove_dir_all(&empty).unwrap();
    }

    /// A CPU comparison of 73 tok/s and GPU ones of 2,200 under one harness: drawn apart, the
    /// newest row's device first, and the other device's rows counted as left out.
    #[test]
    fn history_keeps_one_device() {
        let dir = std::env::temp_dir().join(format!("autoinfer-plot-dev-{}", std::process::id()));
        let row = |t, d, dev| {
            [
                t,
                "aaaaaaaaaaaa",
                d,
                "1.0500 [1.03, 1.07]",
                "KEEP",
                "ok",
                dev,
            ]
        };
        write_results_on(
            &dir,
            &[
                row("t1", "2200.0", "cuda:0"),
                row("t2", "73.0", "cpu"),
                row("t3", "75.0", "cpu, 1 thread"),
                row("t4", "2260.0", "cuda:0"),
            ],
        );
        let h = History::read(&dir, None, None).unwrap();
        assert_eq!(h.device, "cuda:0");
        let decode: Vec<f64> = h.experiments.iter().filter_map(|e| e.decode).collect();
        assert_eq!(decode, [2200.0, 2260.0]);
        assert_eq!((h.other_device_rows, h.other_harness_rows), (2, 0));
        let one = History::read(&dir, None, Some("cpu, 1 thread")).unwrap();
        assert_eq!(one.experiments.len(), 1);
        let err = History::read(&dir, None, Some("cuda:1"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("on device \"cuda:1\"") && err.contains("cpu, cpu, 1 thread, cuda:0"),
            "{err}"
        );
        let (svg, _) = draw(&h, &dir.join("progress")).unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().contains("cuda:0"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Comparisons on a synthetic shape share the harness and device but not the model: only
    /// the newest row's model is drawn, the others counted as left out.
    #[test]
    fn history_keeps_one_model() {
        let dir = std::env::temp_dir().join(format!("autoinfer-plot-model-{}", std::process::id()));
        let row = |t, d| {
            [
                t,
                "aaaaaaaaaaaa",
                d,
                "1.0500 [1.03, 1.07]",
                "KEEP",
                "ok",
                "cuda:0",
            ]
        };
        write_results_on(
            &dir,
            &[row("t1", "2200.0"), row("t2", "300.0"), row("t3", "2260.0")],
        );
        // Row t2 ran on another model (the rows' model column is "x" otherwise).
        let path = dir.join("results.tsv");
        let column = crate::ledger::row::COLUMNS
            .iter()
            .position(|c| *c == "model")
            .unwrap();
        let text: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                let mut f: Vec<&str> = l.split('\t').collect();
                if f[0] == "t2" {
                    f[column] = "synth-8b";
                }
                f.join("\t")
            })
            .collect();
        std::fs::write(&path, text.join("\n") + "\n").unwrap();
        let h = History::read(&dir, None, None).unwrap();
        let decode: Vec<f64> = h.experiments.iter().filter_map(|e| e.decode).collect();
        assert_eq!(decode, [2200.0, 2260.0]);
        assert_eq!(h.other_model_rows, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
