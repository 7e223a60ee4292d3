// Dreambooth tab: a task id and the WebUI's progress bar for Start/Resume, polling of the run's status (loss
// chart, samples, errors) while a run is active, and a confirmation before a save overwrites a project.
// Works in the WebUI (which provides randomId, requestProgress, gradioApp, onUiLoaded) and in the standalone
// page (which does not).

function dreamboothApp() {
    if (typeof gradioApp === 'function') return gradioApp();
    var app = document.querySelector('gradio-app');
    return app && app.shadowRoot ? app.shadowRoot : document;
}

var dreamboothPoll = {timer: null, since: 0};

function dreamboothState() {
    var status = dreamboothApp().querySelector('#dreambooth_status .dreambooth-status');
    return status ? status.dataset.state : null;
}

function dreamboothRefresh() {
    var button = dreamboothApp().querySelector('#dreambooth_refresh');
    if (button) button.click();
}

// Poll the status once a second while a run is active; a few seconds' grace after a start, because the
// status still shows the previous run until the new one has reported.
function dreamboothWatch() {
    dreamboothPoll.since = Date.now();
    if (dreamboothPoll.timer) return;
    dreamboothRefresh();
    dreamboothPoll.timer = setInterval(function() {
        dreamboothShowLoraCards();
        var state = dreamboothState();
        var settled = state === null || ['idle', 'finished', 'cancelled', 'failed'].indexOf(state) >= 0;
        if (settled && Date.now() - dreamboothPoll.since > 4000) {
            clearInterval(dreamboothPoll.timer);
            dreamboothPoll.timer = null;
            return;
        }
        dreamboothRefresh();
    }, 1000);
}

// The cards of the LoRA files the last run wrote, in the Lora tab of txt2img and img2img. The host rebuilds the
// cards it sends to pages loaded from now on, but a page already open keeps the cards it drew: ask the host for
// each missing card (its own get-single-card route, as its card editor does) once the run has ended (no more
// files to come, and no refresh of the Lora list under way). Not on the standalone page, which has no Lora tab,
// nor where the host's extraNetworks.js (requestGet) is missing. Not the Lora tab's Refresh either: it also
// refreshes the Checkpoints page, which selects the --ckpt file again.
var dreamboothCardsAsked = {};

function dreamboothLoraNames() {
    var status = dreamboothApp().querySelector('#dreambooth_status .dreambooth-status');
    if (!status || !status.dataset.loraNames || ['finished', 'cancelled', 'failed'].indexOf(status.dataset.state) < 0) {
        return [];
    }
    try {
        return JSON.parse(status.dataset.loraNames);
    } catch (e) {
        return [];
    }
}

function dreamboothShowLoraCards() {
    if (typeof requestGet !== 'function') return;
    dreamboothLoraNames().forEach(function(name) {
        ['txt2img', 'img2img'].forEach(function(tab) {
            var key = tab + '/' + name;
            var cards = dreamboothApp().querySelector('#' + tab + '_lora_cards');
            if (!cards || dreamboothCardsAsked[key] || dreamboothLoraCard(cards, name)) return;
            dreamboothCardsAsked[key] = true; // once a page: a host without the route is not asked again
            requestGet('./sd_extra_networks/get-single-card', {page: 'lora', tabname: tab, name: name}, function(data) {
                dreamboothAddLoraCard(tab, name, data && data.html);
            }, function() {
                console.warn('Dreambooth: the WebUI did not send the Lora card of ' + name + ' (' + tab + '); ' +
                             "the Lora tab's Refresh shows it.");
            });
        });
    });
}

function dreamboothLoraCard(cards, name) {
    return cards.querySelector('.card[data-name="' + CSS.escape(name) + '"]');
}

function dreamboothAddLoraCard(tab, name, cardHtml) {
    var cards = dreamboothApp().querySelector('#' + tab + '_lora_cards');
    if (!cards || !cardHtml) return; // no card: the host hides that file's card (a hidden folder)
    var holder = document.createElement('div');
    holder.innerHTML = cardHtml;
    var card = holder.firstElementChild;
    if (!card || dreamboothLoraCard(cards, name)) return; // drawn meanwhile (the tab's Refresh)
    var none = cards.querySelector('.nocards');
    if (none) none.remove();
    cards.appendChild(card);
    // The tab's search box and sort order apply to the new card too, as after its Refresh.
    if (typeof applyExtraNetworkFilter === 'function') applyExtraNetworkFilter(tab + '_lora');
}

// _js of Start and Resume: the first input is the task id the host's progress API tracks. The page hands it the
// event's inputs and then its outputs; gradio takes as many values as there are inputs. None of those inputs is a
// gr.State: gradio 4 fills a State input only when the list returned has exactly as many values as inputs.
function dreambooth_start() {
    var args = Array.from(arguments);
    var id = typeof randomId === 'function' ? randomId() : 'task(' + Math.random().toString(36).slice(2, 12) + ')';
    args[0] = id;
    if (typeof requestProgress === 'function' && typeof opts !== 'undefined') {
        var container = dreamboothApp().querySelector('#dreambooth_progressbar');
        if (container) requestProgress(id, container, null, dreamboothRefresh);
    }
    dreamboothWatch();
    return args;
}

// _js of Save: inputs are (overwrite, existing project names as JSON, project name, ...form).
function dreambooth_confirm_save() {
    var args = Array.from(arguments);
    var existing = [];
    try {
        existing = JSON.parse(args[1] || '[]');
    } catch (e) {
        existing = [];
    }
    args[0] = existing.indexOf(args[2]) >= 0 &&
        confirm('Project "' + args[2] + '" exists already. Overwrite its saved settings?');
    return args;
}

// The model box shows what the host has loaded, which changes outside this tab (the checkpoint dropdown at the
// top of the page). While the tab is on screen and no run is being followed, ask every few seconds; the answer
// carries the box only when the host loaded another model. Every tick, visible or not, adds the Lora cards that
// the status last shown names and the page lacks.
setInterval(function() {
    dreamboothShowLoraCards();
    if (dreamboothPoll.timer || document.visibilityState !== 'visible') return;
    var status = dreamboothApp().querySelector('#dreambooth_status');
    if (status && status.offsetParent !== null) dreamboothRefresh();
}, 5000);

// After a (re)load: a run that is already going (e.g. started through the API), and what the host has loaded by
// now (the form of the last run comes back through the tab's own load event).
if (typeof onUiLoaded === 'function') {
    onUiLoaded(dreamboothWatch);
} else {
    setTimeout(dreamboothWatch, 500);
}
