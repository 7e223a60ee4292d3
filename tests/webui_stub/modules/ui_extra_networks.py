"""Stand-in for modules.ui_extra_networks: the extra-networks pages (Lora, Checkpoints, ...) under txt2img and img2img,
re-implemented from v1.10.1's source for how their cards reach the page.

- Each page lists its items when `create_html(tabname)` runs (`list_items()`), and `refresh()` re-scans its folder.
- `create_ui(interface, unrelated_tabs, tabname)` runs once per tab (txt2img, img2img) while the host builds its UI.
  It keeps that tab's pages' HTML in `ui.pages_contents` (an `ExtraNetworksUi`, referenced only by the handlers it
  wires): the interface's load event serves that list to every page load, building it only while it is empty,
  so a page loaded later shows the cards as they were at the first page load. The hidden button
  `{tabname}_{page}_extra_refresh_internal` (which the Refresh icon of each page clicks) refreshes EVERY page
  of the tab (the Checkpoints page through `shared.refresh_checkpoints()`), rebuilds the list, and sends it.
The card HTML is reduced to what tells one card from another: `<div class='card' data-name='…'>`.
"""

import html

import gradio as gr

extra_pages = []
allowed_dirs = set()


def register_page(page):
    """registers extra networks page for the UI; recommend doing it in on_before_ui() callback for extensions"""
    extra_pages.append(page)
    allowed_dirs.clear()
    allowed_dirs.update(set(sum([x.allowed_directories_for_previews() for x in extra_pages], [])))


def quote_js(s):
    import json
    return json.dumps(s, ensure_ascii=False)


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.allow_prompt = True
        self.allow_negative_prompt = False
        self.metadata = {}
        self.items = {}

    def refresh(self):
        pass

    def create_item_html(self, tabname, item, template=None):
        return (f"<div class='card' data-name='{html.escape(item['name'])}' "
                f"data-filename='{html.escape(item.get('filename', ''))}'>{html.escape(item['name'])}</div>")

    def create_html(self, tabname, *, empty=False):
        self.metadata = {}
        items_list = [] if empty else self.list_items()
        self.items = {x["name"]: x for x in items_list}
        cards = "".join(self.create_item_html(tabname, item) for item in self.items.values())
        if not cards:
            cards = "Loading..." if empty else "<div class='nocards'>Nothing here.</div>"
        return (f"<div id='{tabname}_{self.extra_networks_tabname}_pane' class='extra-network-pane'>"
                f"<div id='{tabname}_{self.extra_networks_tabname}_cards' class='extra-network-cards'>{cards}</div>"
                "</div>")

    def create_item(self, name, index=None):
        raise NotImplementedError()

    def list_items(self):
        raise NotImplementedError()

    def allowed_directories_for_previews(self):
        return []


def initialize():
    extra_pages.clear()


def register_default_pages():
    from modules.ui_extra_networks_checkpoints import ExtraNetworksPageCheckpoints
    register_page(ExtraNetworksPageCheckpoints())


class ExtraNetworksUi:
    def __init__(self):
        self.pages = None
        self.page_contents = None
        self.stored_extra_pages = None
        self.button_save_preview = None
        self.preview_target_filename = None
        self.tabname = None


def create_ui(interface, unrelated_tabs, tabname):
    ui = ExtraNetworksUi()
    ui.pages = []
    ui.pages_contents = []
    ui.user_metadata_editors = []
    ui.stored_extra_pages = extra_pages.copy()
    ui.tabname = tabname

    for page in ui.stored_extra_pages:
        with gr.Tab(page.title, elem_id=f"{tabname}_{page.extra_networks_tabname}", elem_classes=["extra-page"]):
            elem_id = f"{tabname}_{page.extra_networks_tabname}_cards_html"
            page_elem = gr.HTML(page.create_html(tabname, empty=True), elem_id=elem_id)
            ui.pages.append(page_elem)

    for page in ui.stored_extra_pages:
        def refresh():
            for pg in ui.stored_extra_pages:
                pg.refresh()
            create_html()
            return ui.pages_contents

        button_refresh = gr.Button("Refresh", elem_id=f"{tabname}_{page.extra_networks_tabname}_extra_refresh_internal",
                                   visible=False)
        button_refresh.click(fn=refresh, inputs=[], outputs=ui.pages)

    def create_html():
        ui.pages_contents = [pg.create_html(ui.tabname) for pg in ui.stored_extra_pages]

    def pages_html():
        if not ui.pages_contents:
            create_html()
        return ui.pages_contents

    interface.load(fn=pages_html, inputs=[], outputs=ui.pages)

    return ui
