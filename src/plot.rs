//! PNG image grids of 28x28 grey images.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

use crate::data::SIDE;

/// Writes `images` (`[N, 784]`, values in [0, 1]) as a grid `cols` wide with a 2-pixel
/// border, through a temporary file and a rename.
pub fn save_grid(images: &Tensor, cols: usize, path: &Path) -> Result<()> {
    let (n, d) = images.dims2()?;
    if d != SIDE * SIDE {
        bail!("save_grid: images must be [N, 784], got [{n}, {d}]");
    }
    let px = images.flatten_all()?.to_vec1::<f32>()?;
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let pad = 2;
    let (w, h) = (cols * (SIDE + pad) + pad, rows * (SIDE + pad) + pad);
    let mut img = image::GrayImage::new(w as u32, h as u32);
    for i in 0..n {
        let (r, c) = (i / cols, i % cols);
        for y in 0..SIDE {
            for x in 0..SIDE {
                let v = px[i * d + y * SIDE + x].clamp(0.0, 1.0);
                let (gx, gy) = (pad + c * (SIDE + pad) + x, pad + r * (SIDE + pad) + y);
                img.put_pixel(
                    gx as u32,
                    gy as u32,
                    image::Luma([(v * 255.0).round() as u8]),
                );
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create folder", dir.display()))?;
    }
    let tmp = crate::checkpoint::tmp_path(path);
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("{}: cannot write PNG", path.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}
