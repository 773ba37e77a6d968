//! PNG image grids (grey or colour) and scatter plots.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

use crate::data::ImageShape;

/// Writes `images` (`[N, C*H*W]`, each C x H x W planar, values in [0, 1]) as a grid `cols`
/// wide with a 2-pixel border: a grey PNG for C = 1, RGB for C = 3, written with
/// [`crate::files::write_atomic`]. Refuses images holding a NaN or an infinity (a picture of
/// them would be a blank grid that looks like a result).
pub fn save_grid(images: &Tensor, shape: ImageShape, cols: usize, path: &Path) -> Result<()> {
    let (n, d) = images.dims2()?;
    if d != shape.dim() || !matches!(shape.channels, 1 | 3) {
        bail!(
            "save_grid: images must be [N, {}] of {shape}, got [{n}, {d}]",
            shape.dim()
        );
    }
    let px = images.flatten_all()?.to_vec1::<f32>()?;
    let bad = px.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        bail!(
            "{}: not written: {bad} of the {} pixel values are not finite (NaN or infinite); the model's weights do not give finite images",
            path.display(),
            px.len()
        );
    }
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let pad = 2;
    let (ih, iw, c) = (shape.height, shape.width, shape.channels);
    let (w, h) = (cols * (iw + pad) + pad, rows * (ih + pad) + pad);
    crate::limits::check_bytes(
        &path.display().to_string(),
        "the PNG grid",
        crate::limits::product(&[w as u64, h as u64, 3]),
    )?;
    let mut img = image::RgbImage::new(w as u32, h as u32);
    for i in 0..n {
        let (r, col) = (i / cols, i % cols);
        for y in 0..ih {
            for x in 0..iw {
                let level = |ch: usize| {
                    let v = px[i * d + (ch * ih + y) * iw + x].clamp(0.0, 1.0);
                    (v * 255.0).round() as u8
                };
                let rgb = if c == 3 {
                    [level(0), level(1), level(2)]
                } else {
                    [level(0); 3]
                };
                let (gx, gy) = (pad + col * (iw + pad) + x, pad + r * (ih + pad) + y);
                img.put_pixel(gx as u32, gy as u32, image::Rgb(rgb));
            }
        }
    }
    if c == 1 {
        save_png(image::DynamicImage::ImageRgb8(img).into_luma8(), path)
    } else {
        save_png(img, path)
    }
}

/// Encodes a PNG in memory and writes it with [`crate::files::write_atomic`] (the folder is
/// created if needed; a link at `path` is refused).
pub fn save_png(img: impl Into<image::DynamicImage>, path: &Path) -> Result<()> {
    let mut png = std::io::Cursor::new(Vec::new());
    img.into()
        .write_to(&mut png, image::ImageFormat::Png)
        .with_context(|| format!("{}: cannot encode PNG", path.display()))?;
    crate::files::write_atomic(path, png.get_ref())
}

/// Images in [-1, 1] (a diffusion model's), `[N, C, H, W]`, as a PNG grid 8 wide (colour for
/// C = 3), through [`save_grid`].
pub fn save_signed_image_grid(x: &Tensor, path: &Path) -> Result<()> {
    let (n, channels, height, width) = x.dims4()?;
    let shape = ImageShape {
        channels,
        height,
        width,
    };
    let img = x.reshape((n, shape.dim()))?.affine(0.5, 0.5)?;
    save_grid(&img, shape, 8, path)
}

/// Side-by-side scatter plots of 2-D point sets (`[N, 2]` row-major each), one 320x320 panel
/// per set over [-4, 4]^2, blue points on white.
pub fn save_scatter(panels: &[&[f32]], path: &Path) -> Result<()> {
    let bad: usize = panels
        .iter()
        .map(|p| p.iter().filter(|v| !v.is_finite()).count())
        .sum();
    if bad > 0 {
        bail!(
            "{}: not written: {bad} coordinates are not finite (NaN or infinite); the model's weights do not give finite samples",
            path.display()
        );
    }
    let side = 320u32;
    let mut img = image::RgbImage::from_pixel(
        side * panels.len() as u32,
        side,
        image::Rgb([255, 255, 255]),
    );
    for (p, pts) in panels.iter().enumerate() {
        for x in 0..side {
            img.put_pixel(p as u32 * side + x, side / 2, image::Rgb([220, 220, 220]));
            img.put_pixel(p as u32 * side + side / 2, x, image::Rgb([220, 220, 220]));
        }
        for xy in pts.chunks(2) {
            let px = ((xy[0] + 4.0) / 8.0 * side as f32) as i64;
            let py = ((4.0 - xy[1]) / 8.0 * side as f32) as i64;
            if (0..side as i64).contains(&px) && (0..side as i64).contains(&py) {
                img.put_pixel(
                    p as u32 * side + px as u32,
                    py as u32,
                    image::Rgb([30, 80, 200]),
                );
            }
        }
        for y in 0..side {
            img.put_pixel(p as u32 * side, y, image::Rgb([0, 0, 0]));
        }
    }
    save_png(img, path)
}
