// The runs page: the header checkbox selects or clears every run of the page.
document.addEventListener("change", (event) => {
  const all = event.target;
  if (!(all instanceof HTMLInputElement) || all.id !== "runs-select-all") return;
  for (const box of document.querySelectorAll('table.runs input[name="run"]')) box.checked = all.checked;
});
