// Polygon rasterisation of mask2former/data/masks/rasterize.py, compiled: the column toggles of
// one polygon (the even-odd column scan of its boundary upsampled 5x, as pycocotools fills
// polygons), their per-column parity fill in a bounding box, and both applied to every polygon
// annotation of an image, painted into its label map in one call. The Python module documents the
// semantics and keeps a NumPy version of both functions; this file computes the same values with
// the same IEEE double operations in the same order, so the two agree exactly.
//
// No fused multiply-add may change a rounding here (x * 5 + 0.5 and the edge interpolation are
// rounded as separate operations, as pycocotools and NumPy compute them).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace {

constexpr double kScale = 5.0;  // pycocotools' boundary upsampling factor

// (int)(scale * x + .5) of C: truncation toward zero
inline int64_t upsampled(double x) { return static_cast<int64_t>(std::trunc(kScale * x + 0.5)); }

}  // namespace

// Number of boundary points of the upsampled polygon (xy: k vertices, x0 y0 x1 y1 ...): an upper
// bound of polygon_column_toggles' count plus one.
extern "C" int64_t polygon_boundary_points(const double* xy, int64_t k) {
  int64_t total = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t j = (i + 1) % k;
    const int64_t dx = std::llabs(upsampled(xy[2 * j]) - upsampled(xy[2 * i]));
    const int64_t dy = std::llabs(upsampled(xy[2 * j + 1]) - upsampled(xy[2 * i + 1]));
    total += std::max(dx, dy) + 1;
  }
  return total;
}

// The toggles of one polygon: in pixel column cols[n] the inside state flips at row rows[n]
// (0..height). cols and rows hold at least polygon_boundary_points(xy, k) entries. Returns the
// number of toggles written.
extern "C" int64_t polygon_column_toggles(const double* xy, int64_t k, int64_t height,
                                          int64_t width, int64_t* cols, int64_t* rows) {
  if (k <= 0) return 0;
  std::vector<int64_t> xs(k), ys(k);
  for (int64_t i = 0; i < k; ++i) {
    xs[i] = upsampled(xy[2 * i]);
    ys[i] = upsampled(xy[2 * i + 1]);
  }
  int64_t count = 0;
  bool started = false;
  int64_t u_prev = 0, v_prev = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t j = (i + 1) % k;
    const int64_t dx = std::llabs(xs[j] - xs[i]), dy = std::llabs(ys[j] - ys[i]);
    const bool horizontal = dx >= dy;
    // each edge is interpolated from its lower end, and walked in its own direction
    const bool flip = horizontal ? xs[i] > xs[j] : ys[i] > ys[j];
    const int64_t sx = flip ? xs[j] : xs[i], ex = flip ? xs[i] : xs[j];
    const int64_t sy = flip ? ys[j] : ys[i], ey = flip ? ys[i] : ys[j];
    const int64_t steps = std::max(dx, dy);
    double slope = 0.0;  // a zero-length edge: one point, its interpolation unused
    if (steps != 0) {
      slope = horizontal ? static_cast<double>(ey - sy) / static_cast<double>(dx)
                         : static_cast<double>(ex - sx) / static_cast<double>(dy);
    }
    const double along = static_cast<double>(horizontal ? sy : sx);
    for (int64_t d = 0; d <= steps; ++d) {
      const int64_t t = flip ? steps - d : d;
      const double product = slope * static_cast<double>(t);
      const int64_t interp = static_cast<int64_t>(std::trunc(along + product + 0.5));
      const int64_t u = horizontal ? t + sx : interp;
      const int64_t v = horizontal ? interp : t + sy;
      if (started && u != u_prev) {
        // a column crossing of the upsampled boundary, down to pixel column and row: the
        // pixel column (column + 0.5) / 5 - 0.5 is whole exactly when column % 5 == 2 (it is
        // then (column - 2) / 5, exactly; otherwise at least 0.1 from a whole number)
        const int64_t column = u < u_prev ? u : u - 1;
        if (((column % 5) + 5) % 5 == 2) {
          const int64_t pixel_column = (column - 2) / 5;
          if (pixel_column >= 0 && pixel_column <= width - 1) {
            double yd = (static_cast<double>(std::min(v, v_prev)) + 0.5) / kScale - 0.5;
            yd = std::ceil(std::min(std::max(yd, 0.0), static_cast<double>(height)));
            cols[count] = pixel_column;
            rows[count] = static_cast<int64_t>(yd);
            ++count;
          }
        }
      }
      u_prev = u;
      v_prev = v;
      started = true;
    }
  }
  return count;
}

// The per-column parity fill of n toggles inside the box rows r0..r1, columns c0..c1 (toggles
// at or below row r1 change nothing there; every toggle lies in the box's columns and at or
// below row r0): grid is the (r1 - r0) x (c1 - c0) uint8 mask, row-major, zeroed here.
extern "C" void fill_column_toggles(const int64_t* cols, const int64_t* rows, int64_t n, int64_t r0,
                                    int64_t r1, int64_t c0, int64_t c1, uint8_t* grid) {
  const int64_t box_width = c1 - c0;
  std::fill(grid, grid + (r1 - r0) * box_width, uint8_t{0});
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] < r1) grid[(rows[i] - r0) * box_width + (cols[i] - c0)] ^= 1;
  }
  for (int64_t r = 1; r < r1 - r0; ++r) {
    uint8_t* row = grid + r * box_width;
    const uint8_t* above = row - box_width;
    for (int64_t c = 0; c < box_width; ++c) row[c] ^= above[c];
  }
}

namespace {

// label[r][c] = value where the (r1 - r0) x (c1 - c0) mask is set (a select per byte, which
// vectorises: the mask and the label map do not overlap).
void paint_box(const uint8_t* __restrict mask, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
               uint8_t value, int64_t width, uint8_t* __restrict label) {
  const int64_t box_width = c1 - c0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* __restrict inside = mask + (r - r0) * box_width;
    uint8_t* __restrict out = label + r * width + c0;
    for (int64_t c = 0; c < box_width; ++c) out[c] = inside[c] ? value : out[c];
  }
}

}  // namespace

// Paints the polygon annotations of one image into its label map in one call: annotation a
// (in painting order, later ones on top) is the union of its polygons
// annotation_start[a] .. annotation_start[a + 1] - 1, polygon p the doubles
// xy[polygon_start[p] .. polygon_start[p + 1]) (x0 y0 x1 y1 ..., a trailing odd value unused);
// its pixels get values[a]. The same scan, bounding box and per-polygon parity fill as
// polygon_column_toggles and fill_column_toggles called polygon by polygon (rasterize.py's
// polygon_mask), with their buffers kept between polygons: the label map is height x width,
// row-major.
extern "C" void paint_polygon_annotations(const double* xy, const int64_t* polygon_start,
                                          const int64_t* annotation_start, const uint8_t* values,
                                          int64_t num_annotations, int64_t height, int64_t width,
                                          uint8_t* label) {
  // the annotation's toggles (the first `used` entries; the buffers only grow, so nothing is
  // zero-filled again per polygon) and each polygon's end among them
  std::vector<int64_t> cols, rows, ends;
  std::vector<uint8_t> grid, part;
  for (int64_t a = 0; a < num_annotations; ++a) {
    int64_t used = 0;
    ends.clear();
    for (int64_t p = annotation_start[a]; p < annotation_start[a + 1]; ++p) {
      const double* points = xy + polygon_start[p];
      const int64_t k = (polygon_start[p + 1] - polygon_start[p]) / 2;
      const int64_t capacity = polygon_boundary_points(points, k);
      if (static_cast<int64_t>(cols.size()) < used + capacity) {
        cols.resize(used + capacity);
        rows.resize(used + capacity);
      }
      const int64_t count =
          polygon_column_toggles(points, k, height, width, cols.data() + used, rows.data() + used);
      used += count;
      if (count > 0) ends.push_back(used);
    }
    if (used == 0) continue;
    const int64_t r0 = *std::min_element(rows.begin(), rows.begin() + used);
    const int64_t r1 = std::min(*std::max_element(rows.begin(), rows.begin() + used), height);
    const int64_t c0 = *std::min_element(cols.begin(), cols.begin() + used);
    const int64_t c1 = *std::max_element(cols.begin(), cols.begin() + used) + 1;
    if (r1 <= r0) continue;
    const int64_t box_size = (r1 - r0) * (c1 - c0);
    // (fill_column_toggles zeroes its grid itself)
    if (static_cast<int64_t>(grid.size()) < box_size) grid.resize(box_size);
    if (ends.size() > 1 && static_cast<int64_t>(part.size()) < box_size) part.resize(box_size);
    int64_t begin = 0;
    for (size_t i = 0; i < ends.size(); ++i) {
      uint8_t* target = i == 0 ? grid.data() : part.data();
      fill_column_toggles(cols.data() + begin, rows.data() + begin, ends[i] - begin, r0, r1, c0,
                          c1, target);
      if (i > 0) {
        for (int64_t j = 0; j < box_size; ++j) grid[j] |= part[j];
      }
      begin = ends[i];
    }
    paint_box(grid.data(), r0, r1, c0, c1, values[a], width, label);
  }
}
