// `sqlx::migrate!` embeds the migrations at compile time; without this, a new migration
// file alone would not rebuild the crate (the sqlx docs' recommended build script).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
