#!/usr/bin/env sh
# Add FewShot Studio to the Linux desktop menu for the current user (XDG): the .desktop entry
# (it opens a project file given as %f), the project file type (*.fsproj, see
# fewshot-studio-mime.xml) and the app icon (resources/icons: SVG + PNG sizes) in the hicolor
# icon theme.
#
#   packaging/install-desktop-entry.sh [EXECUTABLE]
#
# EXECUTABLE defaults to the built bundle dist/fewshot-studio/fewshot-studio if present, else
# the `fewshot-studio` command on PATH (pip install). Run from a source checkout.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
icons="$root/resources/icons"
exe=${1:-}
if [ -z "$exe" ]; then
    if [ -x "$root/dist/fewshot-studio/fewshot-studio" ]; then
        exe="$root/dist/fewshot-studio/fewshot-studio"
    else
        exe=$(command -v fewshot-studio) || { echo "fewshot-studio not found" >&2; exit 1; }
    fi
fi
data=${XDG_DATA_HOME:-$HOME/.local/share}
for png in "$icons"/fewshot-studio-*.png; do
    size=$(basename "$png" .png | sed 's/^fewshot-studio-//')
    mkdir -p "$data/icons/hicolor/${size}x${size}/apps"
    cp "$png" "$data/icons/hicolor/${size}x${size}/apps/fewshot-studio.png"
done
mkdir -p "$data/icons/hicolor/scalable/apps" "$data/applications" "$data/mime/packages"
cp "$icons/fewshot-studio.svg" "$data/icons/hicolor/scalable/apps/fewshot-studio.svg"
cp "$here/fewshot-studio-mime.xml" "$data/mime/packages/fewshot-studio.xml"
sed "s|^Exec=.*|Exec=\"$exe\" %f|" "$here/fewshot-studio.desktop" \
    > "$data/applications/fewshot-studio.desktop"
command -v update-mime-database >/dev/null 2>&1 && update-mime-database "$data/mime" || true
command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$data/applications" || true
command -v gtk-update-icon-cache >/dev/null 2>&1 && gtk-update-icon-cache -q -t "$data/icons/hicolor" || true
echo "installed $data/applications/fewshot-studio.desktop (Exec=$exe)"
